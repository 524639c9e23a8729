"""deploy/kuberay/rayservice.yaml stays in step with serve_configs/qwen3.yaml: its serveConfigV2
carries the same application (import_path and args), and its GPU worker groups hold the grids that
the args ask for (tp_size * pp_size GPUs per replica, each pipeline stage's tp_size GPUs in one pod)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
CONFIG = ROOT / "serve_configs" / "qwen3.yaml"


def _load(path: Path) -> dict:
    d = yaml.safe_load(path.read_text())
    assert isinstance(d, dict), path
    return d


def _pod_gpus(group: dict) -> int:
    (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
    res = container.get("resources", {})
    limits = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
    requests = int(res.get("requests", {}).get("nvidia.com/gpu", limits))
    assert requests == limits, "GPUs: requests and limits must agree"
    return limits


def test_manifest_carries_the_qwen3_application():
    manifest, config = _load(MANIFEST), _load(CONFIG)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    (want,) = config["applications"]
    assert app["import_path"] == want["import_path"] == "nanovllmx.serve:build_app"
    assert app["args"] == want["args"]
    assert app.get("route_prefix") == want.get("route_prefix") and app["name"] == want["name"]
    assert serve_config["http_options"]["port"] == config["http_options"]["port"]
    # the same HTTP ingress (Serve's HAProxy in front of the replicas' own ports)
    assert serve_config["controller_options"] == config["controller_options"]
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # the pod's service must reach the proxy


def test_worker_groups_hold_the_grids():
    manifest = _load(MANIFEST)
    args = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]
    tp, pp = int(args.get("tp_size", 1)), int(args.get("pp_size", 1))
    auto = args.get("autoscaling_config")
    replicas = int(auto["max_replicas"]) if auto else int(args.get("num_replicas", 1))
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert _pod_gpus(head) == 0 and head["rayStartParams"].get("num-gpus") == "0", "the head holds no GPUs"
    assert cluster["rayVersion"].split(".")[:2] == ["2", "60"]
    # a stage (its tp GPUs) lands on one node: count the pods that can hold one
    stage_pods, gpus = 0, 0
    for group in cluster["workerGroupSpecs"]:
        n, per_pod = int(group["replicas"]), _pod_gpus(group)
        assert int(group.get("minReplicas", n)) <= n <= int(group.get("maxReplicas", n)), group["groupName"]
        most = int(group.get("maxReplicas", n)) if auto else n
        gpus += most * per_pod
        if per_pod >= tp:
            stage_pods += most * (per_pod // tp)
        for c in group["template"]["spec"]["containers"]:
            assert "image" in c and c["image"] == head["template"]["spec"]["containers"][0]["image"]
    need = tp * pp * replicas
    assert gpus >= need, f"{gpus} GPUs in the worker groups, the app needs tp*pp*replicas = {need}"
    assert stage_pods >= pp * replicas, f"{stage_pods} pods with >= {tp} GPUs, need one per stage: {pp * replicas}"
