"""Single node: GET of existing keys (10k keys, 100-byte values). See single.py."""
import single

if __name__ == "__main__":
    single.main("get_hit")
