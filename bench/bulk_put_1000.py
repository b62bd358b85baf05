"""
Single node: POST /bulk with 1000 PUTs each (100-byte values, random keys over 100k keys), issue 18's goal of
200k keys/s. ``ops_per_s`` is keys/s, ``cpu_us_per_op`` the server's CPU per key. See single.py.
"""
import single

if __name__ == "__main__":
    single.main("bulk_put_1000")
