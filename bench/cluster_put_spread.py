"""3 nodes RF=2: PUT spread over all nodes. See cluster.py."""
import cluster

if __name__ == "__main__":
    cluster.main("cluster_put_spread")
