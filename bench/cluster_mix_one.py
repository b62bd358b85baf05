"""3 nodes RF=2: 90/10 GET/PUT through one node. See cluster.py."""
import cluster

if __name__ == "__main__":
    cluster.main("cluster_mix_one")
