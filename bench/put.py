"""Single node: PUT of 100-byte values over 10k keys. See single.py."""
import single

if __name__ == "__main__":
    single.main("put")
