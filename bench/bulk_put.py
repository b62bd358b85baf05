"""Single node: POST /bulk with 100 PUTs each (100-byte values, 10k keys). See single.py."""
import single

if __name__ == "__main__":
    single.main("bulk_put")
