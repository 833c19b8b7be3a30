"""Run by tests/test_ray_train.py in a process of its own: one training epoch on a two-node Ray cluster.

`ray.cluster_utils.Cluster` starts a head and a second node (2 CPUs each) on this machine; the run places
one Ray Train worker per node (STRICT_SPREAD), with the frozen-backbone vector caches, and logs every
batch. A separate process keeps this cluster
apart from the test session's own `ray.init`.

    python tests/ray_multinode_train.py OUTPUT_DIR   -> prints one JSON line: the cluster's node ids
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main(output_dir: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from uue.config import load_config
    from uue.model.folder import read_output_dim
    from uue.train import TrainProbe
    from uue.train.ray import run_training

    # 2 CPUs a node: beside a 0.5-CPU worker, Ray Data's file listing task needs a whole CPU free on some node
    # (it takes no num_cpus from read_parquet), and with 1-CPU nodes the read waits forever.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 300_000_000})
    cluster.add_node(num_cpus=2, object_store_memory=300_000_000)
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
        config = load_config(REPO_ROOT / "configs" / "tiny.yaml", [
            f"training.output_dir={output_dir}", "training.max_steps=null", "model.num_epochs=1",
            "model.batch_size=8", "distributed.num_workers=2", "distributed.cpus_per_worker=0.5",
            "distributed.featurize_cpus=0.25", "distributed.placement_strategy=STRICT_SPREAD",
            "distributed.zero_stage=1", f"data.path={REPO_ROOT / 'uue' / 'data' / 'sample_data'}",
            # the demo's CPU path: frozen backbones, chunk and statement vectors cached in each worker
            "model.freeze_user_backbone=true", "model.cache_chunk_vectors=true",
            "model.freeze_item_backbone=true", "model.cache_statement_vectors=true",
            # and the pretrained path, fitted on the driver from the raw folder once the workers are done
            "model.use_attention_pooling=false", "model.pretrained_path_weight=0.5",
        ])
        result = run_training(config, probe=TrainProbe(batch_log_dir=str(Path(output_dir) / "batch_log")))
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        print(json.dumps({"nodes": nodes, "steps": result.steps, "model_dir": str(result.model_dir),
                          "output_dim": read_output_dim(result.model_dir / "item_tower")}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
