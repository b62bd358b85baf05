"""Single node: POST /bulk with 100 GETs each (10k keys). See single.py."""
import single

if __name__ == "__main__":
    single.main("bulk_get")
