"""Single node: GET of absent keys (404 expected, not an error). See single.py."""
import single

if __name__ == "__main__":
    single.main("get_miss")
