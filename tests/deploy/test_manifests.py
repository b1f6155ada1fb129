"""deploy/k8s: every overlay renders, validates against the Kubernetes schemas, and holds together.

Built-in kinds are checked by kubernetes-validate (offline schemas); the Prometheus Operator's
custom resources, which it has no schema for, are checked here field by field. The ConfigMaps'
embedded configs go through the gateway's own loader (`shadowserve check-config`).
"""

from __future__ import annotations

import copy
import json
import re

import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from server.config import host_port, parse_config
from tests.deploy.support import DEPLOY, OVERLAYS, REPO, find, render, run_script, shadowserve

KUBERNETES_VERSION = "1.31.0"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
STAGES = {"shadow": (100, 0), "canary": (100, 5), "cutover": (100, 100), "legacy-remote": (100, 0)}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def configs(objects: list[dict]) -> dict[str, dict]:
    """The shadowserve configs embedded in ConfigMaps, by ConfigMap name."""
    return {obj["metadata"]["name"]: yaml.safe_load(obj["data"]["shadow.yaml"])
            for obj in objects if obj["kind"] == "ConfigMap" and "shadow.yaml" in obj.get("data", {})}


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def test_the_overlays_are_the_stages_of_a_cutover():
    assert set(OVERLAYS) == set(STAGES)


def test_every_builtin_object_validates_against_the_kubernetes_schemas(rendered):
    for overlay, objects in rendered.items():
        for obj in objects:
            if obj["kind"] in CUSTOM_KINDS:
                continue
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {error.message} at {list(error.path)}")
        assert {obj["kind"] for obj in objects} - CUSTOM_KINDS >= {
            "Namespace", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"}


def test_the_schema_check_rejects_a_broken_deployment(rendered):
    deployment = copy.deepcopy(find(rendered["shadow"], "Deployment", "shadowserve"))
    pod_spec(deployment)["containers"][0]["ports"][0]["containerPort"] = "8001"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_embedded_config_passes_the_gateways_loader(rendered, tmp_path):
    for overlay, objects in rendered.items():
        for name, config in configs(objects).items():
            path = tmp_path / f"{overlay}-{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            result = shadowserve("check-config", "--skip-local", str(path))
            assert result.returncode == 0 and "valid" in result.stdout, (overlay, name, result.stderr)


def test_check_config_rejects_a_broken_configmap_naming_the_key(rendered, tmp_path):
    config = configs(rendered["shadow"])["shadowserve-config"]
    config["models"][0]["serve_percent"] = 150
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    result = shadowserve("check-config", "--skip-local", str(path))
    assert result.returncode == 2
    assert "models[0].serve_percent" in result.stderr


def test_overlays_differ_from_the_shadow_stage_only_in_percentages(rendered):
    base = configs(rendered["shadow"])["shadowserve-config"]
    for overlay, (shadow, serve) in STAGES.items():
        config = configs(rendered[overlay])["shadowserve-config"]
        for model in config["models"]:
            assert (model["shadow_percent"], model["serve_percent"]) == (shadow, serve), overlay
        if overlay == "legacy-remote":
            continue  # its legacy is remote: checked in test_legacy_as_its_own_deployment
        normalised = copy.deepcopy(config)
        for model, base_model in zip(normalised["models"], base["models"]):
            model.update(shadow_percent=base_model["shadow_percent"], serve_percent=base_model["serve_percent"])
        assert normalised == base, f"{overlay}/shadow.yaml drifted from base/shadow.yaml beyond the percentages"


def test_gateway_deployment_is_ready_for_production(rendered):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    image_uid = int(re.search(r"^USER (\d+)", dockerfile, re.M).group(1))
    for overlay, objects in rendered.items():
        deployment = find(objects, "Deployment", "shadowserve")
        spec = pod_spec(deployment)
        (gateway,) = spec["containers"]
        config_arg = gateway["args"][gateway["args"].index("--config") + 1]
        config = parse_config(configs(objects)["shadowserve-config"], overlay, check_files=False)
        grpc_port = host_port(config.server.grpc_listen)[1]
        ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": host_port(config.server.metrics_listen)[1]}

        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert gateway[probe]["grpc"]["port"] == grpc_port, (overlay, probe)
        startup = gateway["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "models need time to load"
        pre_stop = int(gateway["lifecycle"]["preStop"]["exec"]["command"][1])
        drain = pre_stop + config.server.drain_s + config.server.grace_s
        assert spec["terminationGracePeriodSeconds"] > drain, "preStop, drain_s and grace_s must fit in the grace period"

        mounts = {mount["name"]: mount for mount in gateway["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        config_mount = next(m for m in mounts.values() if config_arg.startswith(m["mountPath"] + "/"))
        assert "subPath" not in config_mount, "subPath mounts never see ConfigMap updates"
        assert volumes[config_mount["name"]]["configMap"]["name"] == "shadowserve-config"
        assert config_arg.rsplit("/", 1)[1] in find(objects, "ConfigMap", "shadowserve-config")["data"]
        for model in config.models:
            for backend in (model.legacy, model.candidate):
                for field in ("symbol", "params", "prototxt", "caffemodel", "path"):
                    path = getattr(backend, field, None)
                    if path is not None:
                        assert any(str(path).startswith(m["mountPath"] + "/") for m in mounts.values()), path

        security = gateway["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert security["capabilities"]["drop"] == ["ALL"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == image_uid
        assert {"/tmp", "/dev/shm"} <= {m["mountPath"] for m in mounts.values()}, "writable places on a read-only root"
        assert gateway["resources"]["requests"]["cpu"] and gateway["resources"]["limits"]["memory"]
        anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
        assert anti["podAffinityTerm"]["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_services_budgets_and_autoscalers_select_their_pods(rendered):
    for overlay, objects in rendered.items():
        deployments = [obj for obj in objects if obj["kind"] == "Deployment"]

        def selected(selector: dict) -> list[dict]:
            return [d for d in deployments
                    if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]

        for service in (obj for obj in objects if obj["kind"] == "Service"):
            (deployment,) = selected(service["spec"]["selector"])
            names = {port["name"] for container in pod_spec(deployment)["containers"] for port in container["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names, (overlay, service["metadata"]["name"], port)
        for budget in (obj for obj in objects if obj["kind"] == "PodDisruptionBudget"):
            assert len(selected(budget["spec"]["selector"]["matchLabels"])) == 1, budget["metadata"]["name"]
        hpa = find(objects, "HorizontalPodAutoscaler", "shadowserve")
        assert hpa["spec"]["scaleTargetRef"]["name"] == "shadowserve"
        assert hpa["spec"]["minReplicas"] >= 2, "one replica cannot be drained without an outage"
        assert all(obj["metadata"].get("namespace") == "shadowserve" for obj in objects if obj["kind"] != "Namespace")


def test_candidate_points_at_the_triton_service_and_model_repository(rendered):
    objects = rendered["shadow"]
    config = parse_config(configs(objects)["shadowserve-config"], "shadow", check_files=False)
    triton = find(objects, "Deployment", "triton")
    (container,) = pod_spec(triton)["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    service = find(objects, "Service", "triton")
    for model in config.models:
        host, port = model.candidate.url.rsplit(":", 1)
        assert host == service["metadata"]["name"]
        assert int(port) in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}

        repository = DEPLOY / "triton" / "model_repository" / model.candidate.model
        parsed = text_format.Parse((repository / "config.pbtxt").read_text(), mc.ModelConfig())
        assert parsed.name == model.candidate.model and parsed.platform == "pytorch_libtorch"
        assert [group.kind for group in parsed.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert (repository / "1").is_dir()
        names = model.candidate.tensor_names
        for declared, tensors in ((model.inputs, parsed.input), (model.outputs, parsed.output)):
            by_name = {tensor.name: tensor for tensor in tensors}
            for tensor in declared:
                triton_tensor = by_name[names.get(tensor.name, tensor.name)]
                assert mc.DataType.Name(triton_tensor.data_type) == f"TYPE_{tensor.datatype}"
                assert list(triton_tensor.dims) == tensor.shape[1:], "Triton's dims exclude the batch dimension"
                assert tensor.shape[0] == -1 and parsed.max_batch_size > 0


def test_legacy_as_its_own_deployment(rendered, tmp_path):
    objects = rendered["legacy-remote"]
    config = parse_config(configs(objects)["shadowserve-config"], "legacy-remote", check_files=False)
    legacy_config = parse_config(configs(objects)["legacy-config"], "legacy-config", check_files=False)
    service = find(objects, "Service", "legacy")
    assert "initContainers" not in pod_spec(find(objects, "Deployment", "shadowserve")), "the gateway loads no legacy files"
    legacy_models = {model.name: model for model in legacy_config.models}
    for model in config.models:
        assert model.legacy.runtime == "remote"
        host, port = model.legacy.url.rsplit(":", 1)
        assert host == service["metadata"]["name"] and int(port) == service["spec"]["ports"][0]["port"]
        served = legacy_models[model.legacy.model]
        assert served.candidate is None and [t.name for t in served.inputs] == [t.name for t in model.inputs]
    in_pod = parse_config(configs(rendered["shadow"])["shadowserve-config"], "shadow", check_files=False)
    assert [model.legacy.runtime for model in in_pod.models] == ["mxnet"], "the other overlays keep legacy in the pod"


def test_monitoring_custom_resources(rendered):
    for overlay, objects in rendered.items():
        rule = find(objects, "PrometheusRule", "shadowserve")
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        source = yaml.safe_load((DEPLOY / "prometheus" / "shadowserve.rules.yml").read_text())
        assert rule["spec"] == source, "the PrometheusRule carries deploy/prometheus/shadowserve.rules.yml"
        for monitor in (obj for obj in objects if obj["kind"] == "ServiceMonitor"):
            assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
            assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
            services = [s for s in objects if s["kind"] == "Service"
                        and monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
            assert len(services) == 1, (overlay, monitor["metadata"]["name"])
            port_names = {port["name"] for port in services[0]["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
                assert endpoint["port"] in port_names and re.fullmatch(r"\d+s", endpoint["interval"])
        monitored = {s["metadata"]["name"] for s in objects if s["kind"] == "Service"
                     for m in objects if m["kind"] == "ServiceMonitor"
                     if m["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()}
        assert "shadowserve" in monitored, "the gateway must be scraped (its job name is the Service's)"


def test_the_prometheusrule_file_is_generated_from_the_rules():
    result = run_script(DEPLOY / "prometheus" / "prometheusrule.py", "--check")
    assert result.returncode == 0, result.stderr


def test_grafana_dashboard_configmap_is_the_dashboard(rendered):
    for objects in rendered.values():
        configmap = find(objects, "ConfigMap", "shadowserve-dashboard")
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1", "Grafana's sidecar looks for this label"
        assert json.loads(configmap["data"]["shadowserve.json"]) == json.loads(
            (REPO / "dashboards" / "shadowserve.json").read_text())
        # the live-reloaded config keeps its name: a hash suffix would roll the pods instead
        assert find(objects, "ConfigMap", "shadowserve-config")
