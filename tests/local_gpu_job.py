"""A job for the local autoscaling cluster: 8 short tasks that each need one `local_gpu` (what a GPU is there), so
the GPU node type must come up from zero to run them; prints the node of each task."""

import time

import ray

ray.init()


@ray.remote(num_cpus=1, resources={"local_gpu": 1})
def on_a_gpu_node() -> str:
    time.sleep(4)
    return ray.get_runtime_context().get_node_id()


print(sorted(set(ray.get([on_a_gpu_node.remote() for _ in range(8)]))))
