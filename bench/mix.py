"""Single node: 90% GET / 10% PUT over 10k keys. See single.py."""
import single

if __name__ == "__main__":
    single.main("mix")
