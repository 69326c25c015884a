"""deploy/: the load balancer, container, Kubernetes and monitoring files,
checked against the daemon they deploy. Fast and offline: every YAML and
JSON file parses; the Kubernetes objects are the kinds expected, and their
probes, ports and flags are the daemon's own (read from server/); every
metric the Grafana dashboard, the HPA and the adapter rules name exists in
server/metrics.c; the nginx and HAProxy configurations pass `nginx -t` and
`haproxy -c` where those are installed; the Dockerfiles, which cannot be
built here (no container registry, no Docker daemon), are checked line by
line. tests/integration/test_deploy_lb.py runs nginx for real.
"""
import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SERVER = ROOT / "server"


def _which(name):
    return shutil.which(name) or next(
        (str(p) for p in (pathlib.Path("/usr/sbin") / name, pathlib.Path("/sbin") / name)
         if p.exists()), None)


# ------------------------------------------------------ the daemon's facts

def daemon_routes():
    """{path: method} from the route table in server/api.c."""
    src = (SERVER / "api.c").read_text()
    return dict(re.findall(r'\{"(/[a-z/{}_]*)", "([A-Z]+)", R_[A-Z_]+\}', src))


def daemon_default_port():
    m = re.search(r"a->port = (\d+);", (SERVER / "serve.c").read_text())
    assert m, "no default port in server/serve.c"
    return int(m.group(1))


def daemon_default_drain_timeout():
    m = re.search(r"a->drain_timeout = (\d+);", (SERVER / "serve.c").read_text())
    assert m, "no default drain timeout in server/serve.c"
    return int(m.group(1))


def daemon_max_body_bytes():
    m = re.search(r"max_body_bytes = (\d+) \* 1024 \* 1024;", (SERVER / "http.c").read_text())
    assert m, "no default max_body_bytes in server/http.c"
    return int(m.group(1)) * 1024 * 1024


def serve_flags():
    """The long options of `inferd serve` (server/serve.c's getopt table):
    {name: takes an argument}."""
    src = (SERVER / "serve.c").read_text()
    return {n: kind == "required_argument"
            for n, kind in re.findall(r'\{"([a-z0-9-]+)", (required_argument|no_argument), 0,',
                                      src)}


def metric_families():
    """{name without prefix: kind} of every family server/metrics.c writes."""
    src = (SERVER / "metrics.c").read_text()
    fams = {}
    for kind, name in re.findall(r'\b(gauge|counter|hist)\(&m, "([a-z_0-9]+)"', src):
        fams[name] = kind
    for name, kind in re.findall(r'\bhead\(&m, "([a-z_0-9]+)", "([a-z]+)"', src):
        fams[name] = {"histogram": "hist"}.get(kind, kind)
    assert "num_requests_waiting" in fams and "time_to_first_token_seconds" in fams, fams
    return fams


def metric_series():
    """Every series name /metrics can carry (histograms with their
    _bucket, _sum and _count), with the inferd: prefix."""
    out = set()
    for name, kind in metric_families().items():
        out.add("inferd:" + name)
        if kind == "hist":
            out |= {f"inferd:{name}{s}" for s in ("_bucket", "_sum", "_count")}
    return out


def metric_labels():
    src = (SERVER / "metrics.c").read_text()
    return set(re.findall(r'[{,]([a-z_]+)=\\"', src)) | {"model_name", "le"}


def promql_metrics(expr):
    return set(re.findall(r"\binferd:[a-zA-Z_][a-zA-Z0-9_]*", expr))


# ------------------------------------------------------------- parsing

def load_yaml(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_objects():
    """The objects kustomization.yaml applies: {(kind, name): object}."""
    objs = {}
    for r in load_yaml(K8S / "kustomization.yaml")[0]["resources"]:
        for d in load_yaml(K8S / r):
            objs[(d["kind"], d["metadata"]["name"])] = d
    return objs


def one(kind):
    found = [o for (k, _), o in k8s_objects().items() if k == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} in deploy/k8s"
    return found[0]


def test_every_yaml_and_json_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 8, files
    for p in files:
        assert load_yaml(p), f"{p} is empty"
    jsons = sorted(DEPLOY.rglob("*.json"))
    assert jsons, "no JSON under deploy/"
    for p in jsons:
        json.loads(p.read_text())


# ---------------------------------------------------------- Kubernetes

def test_k8s_objects_are_the_expected_kinds():
    kinds = {k for k, _ in k8s_objects()}
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                     "ConfigMap"}, kinds
    assert one("Deployment")["apiVersion"] == "apps/v1"
    assert one("PodDisruptionBudget")["apiVersion"] == "policy/v1"
    assert one("HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"
    # every file is applied by kustomize, but the adapter's rules (they go
    # where the adapter runs)
    kust = set(load_yaml(K8S / "kustomization.yaml")[0]["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert files - kust == {"prometheus-adapter-rules.yaml"}, files - kust


def container():
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod, pod["containers"][0]


def test_probes_use_the_daemons_routes_and_port():
    routes = daemon_routes()
    assert routes.get("/health") == "GET" and routes.get("/ready") == "GET", routes
    port = daemon_default_port()
    pod, c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": port}, ports
    assert f"--port={port}" in c["args"] and "--host=0.0.0.0" in c["args"], c["args"]
    want = {"readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health"}
    for probe, path in want.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, (probe, get)
        assert get["port"] in ("http", port), (probe, get)
    # the startup probe gives a large model minutes to load
    sp = c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 300
    # the Service reaches the same port, and Prometheus scrapes it
    svc = one("Service")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    ann = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(port) and ann["prometheus.io/path"] == "/metrics"
    assert routes.get("/metrics") == "GET"


def test_args_name_only_flags_the_daemon_has():
    flags = serve_flags()
    _, c = container()
    cm = one("ConfigMap")["data"]
    env = {e["name"] for e in c.get("env", [])}
    assert c["args"][0] == "serve"
    for a in c["args"][1:]:
        for var in re.findall(r"\$\(([A-Z_]+)\)", a):
            assert var in cm or var in env, f"{a}: ${var} is in neither the ConfigMap nor env"
        if a.startswith("--"):
            name, eq, _ = a[2:].partition("=")
            assert name in flags, f"inferd serve has no --{name}"
            assert flags[name] == bool(eq), f"--{name}: argument mismatch"
    assert [r["configMapRef"]["name"] for r in c["envFrom"]] == \
        [one("ConfigMap")["metadata"]["name"]]


def test_the_grace_period_covers_the_drain():
    pod, c = container()
    cm = one("ConfigMap")["data"]
    drain = int(cm.get("INFERD_DRAIN_TIMEOUT", daemon_default_drain_timeout()))
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pathlib.PurePath(cmd[0]).name == "sleep", \
        "preStop must only wait: a second SIGTERM stops inferd at once"
    pre_stop = int(cmd[1])
    # inferd waits drain seconds, then 5 more for the cancellation to land
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 5, \
        (pod["terminationGracePeriodSeconds"], pre_stop, drain)


def test_gpu_and_resources():
    pod, c = container()
    res = c["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] >= 1
    assert "cpu" in res["requests"] and "memory" in res["requests"]
    assert "--device=$(INFERD_DEVICE)" in c["args"] and one("ConfigMap")["data"]["INFERD_DEVICE"] \
        == "cuda"
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"]


def test_selectors_match_the_pods():
    dep = one("Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for sel in (dep["spec"]["selector"]["matchLabels"], one("Service")["spec"]["selector"],
                one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert sel.items() <= labels.items(), (sel, labels)
    ref = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])


def adapter_rules():
    cm = load_yaml(K8S / "prometheus-adapter-rules.yaml")[0]
    assert cm["kind"] == "ConfigMap"
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def test_the_hpa_scales_on_a_queue_metric_that_exists():
    series = metric_series()
    hpa = one("HorizontalPodAutoscaler")
    names = []
    for m in hpa["spec"]["metrics"]:
        assert m["type"] in ("Pods", "External"), m
        names.append(m[m["type"].lower()]["metric"]["name"])
    assert "inferd_num_requests_waiting" in names, names
    # each HPA metric is one the adapter serves, from a series inferd writes
    served = {}
    for rule in adapter_rules():
        found = promql_metrics(rule["seriesQuery"])
        assert found and found <= series, (rule["seriesQuery"], found - series)
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
        for s in found:
            as_ = re.sub(r"\$\{(\d+)\}", r"\\\1", rule["name"]["as"])
            served[re.sub(rule["name"]["matches"], as_, s)] = s
    for n in names:
        assert n in served, f"the HPA's {n} is not served by any adapter rule: {served}"
        assert ":" not in n


# --------------------------------------------------- Prometheus, Grafana

def test_prometheus_scrapes_metrics_on_the_daemons_port():
    cfg = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    port = daemon_default_port()
    for j in jobs.values():
        assert j.get("metrics_path", "/metrics") == "/metrics"
        for sc in j.get("static_configs", []):
            for t in sc["targets"]:
                assert t.endswith(f":{port}"), t
    pods = [j for j in jobs.values() if "kubernetes_sd_configs" in j]
    assert pods, "no Kubernetes job"
    targets = {r.get("target_label") for j in pods for r in j["relabel_configs"]}
    assert {"namespace", "pod"} <= targets, "the adapter's rules need namespace and pod labels"


def dashboard():
    return json.loads((DEPLOY / "grafana" / "inferd.json").read_text())


def dashboard_exprs(d):
    exprs = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            exprs.append((v["name"], q))
    return exprs


def test_every_metric_in_the_dashboard_exists():
    series, labels = metric_series(), metric_labels()
    used = set()
    for title, expr in dashboard_exprs(dashboard()):
        found = promql_metrics(expr)
        assert found, f"{title}: no inferd metric in {expr}"
        assert found <= series, f"{title}: not in server/metrics.c: {sorted(found - series)}"
        used |= found
        for lb in re.findall(r"\bby \(([a-z_, ]+)\)", expr):
            for name in lb.split(","):
                assert name.strip() in labels | {"instance", "job"}, (title, name)
        for name in re.findall(r"([a-z_]+)=~?\"", expr):
            assert name in labels | {"instance", "job"}, (title, name)
    # the dashboard shows most of what the daemon exports
    fams = {s.split(":")[1] for s in used}
    fams = {re.sub(r"_(bucket|sum|count)$", "", f) if f not in metric_families() else f
            for f in fams}
    assert len(fams) >= 0.8 * len(metric_families()), sorted(set(metric_families()) - fams)


def test_the_dashboard_has_the_panels_operators_look_for():
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in d["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        if p["type"] != "row":
            assert p["targets"], p["title"]
    text = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in d["panels"]}
    want = {
        "tokens/s": "generation_tokens_total",
        "time to first token": "time_to_first_token_seconds_bucket",
        "inter-token latency": "inter_token_latency_seconds_bucket",
        "running / waiting": "num_requests_waiting",
        "kv cache blocks": "kv_cache_blocks",
        "preemptions": "num_preemptions_total",
        "finish reason": "request_success_total",
        "steps ahead": "engine_steps_ahead_total",
        "errors": "http_requests_total",
    }
    for title_part, metric in want.items():
        hits = [t for t in text if title_part in t.lower()]
        assert hits, f"no panel titled like '{title_part}'"
        assert any(metric in text[t] for t in hits), (title_part, metric)
    quantiles = [e for e in text.values() if "histogram_quantile(0.99" in e]
    assert len(quantiles) >= 2


# --------------------------------------------------------------- nginx

def nginx_conf():
    return (DEPLOY / "nginx" / "inferd.conf").read_text()


def test_nginx_config_says_what_it_must():
    conf = "\n".join(ln.split("#")[0] for ln in nginx_conf().splitlines())
    directives = {ln.strip() for ln in conf.splitlines() if ln.strip()}
    for d in ("least_conn;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
              "proxy_buffering off;", "gzip off;", "proxy_read_timeout 1h;",
              "proxy_set_header X-Request-Id $inferd_request_id;"):
        assert d in directives, d
    assert re.search(r"^\s*keepalive \d+;", conf, re.M)
    assert "proxy_ignore_headers" not in conf, "X-Accel-Buffering from the daemon must count"
    m = re.search(r"client_max_body_size (\d+)m;", conf)
    assert m and int(m.group(1)) * 1024 * 1024 == daemon_max_body_bytes()
    nu = re.search(r"proxy_next_upstream ([^;]+);", conf).group(1).split()
    assert {"error", "http_502", "http_503", "non_idempotent"} <= set(nu), nu
    assert re.search(r"proxy_next_upstream_timeout \d+s;", conf)
    servers = re.findall(r"^\s*server \S+:(\d+) (.*);", conf, re.M)
    assert len(servers) >= 2 and all(int(p) == daemon_default_port() for p, _ in servers)
    assert all("max_fails=" in s and "fail_timeout=" in s for _, s in servers)


def _render():
    import importlib.util
    spec = importlib.util.spec_from_file_location("inferd_nginx_render",
                                                  DEPLOY / "nginx" / "render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_changes_only_the_replicas_listen_and_log():
    render = _render()
    out = render.render(nginx_conf(), ["127.0.0.1:9001", "127.0.0.1:9002"],
                        listen="127.0.0.1:8080", log_dir="/tmp/x")
    a, b = nginx_conf().splitlines(), out.splitlines()
    changed = [x for x in a if x not in b]
    assert all(re.match(r"\s*(server \S+:\d+ |listen |access_log )", x) for x in changed), changed
    assert "    server 127.0.0.1:9001 max_fails=3 fail_timeout=10s;" in b


@pytest.mark.skipif(_which("nginx") is None,
                    reason="nginx is not installed (deploy/setup.sh installs nginx-light)")
def test_nginx_accepts_the_config(tmp_path):
    render = _render()
    conf = render.write_standalone(tmp_path, ["127.0.0.1:8001", "127.0.0.1:8002"],
                                   "127.0.0.1:8080")
    r = subprocess.run([_which("nginx"), "-t", "-p", str(tmp_path), "-c", str(conf), "-e",
                        "stderr"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr


# ------------------------------------------------------------- HAProxy

def haproxy_cfg():
    return (DEPLOY / "haproxy" / "haproxy.cfg").read_text()


def test_haproxy_config_says_what_it_must():
    lines = [ln.split("#")[0].strip() for ln in haproxy_cfg().splitlines()]
    lines = [ln for ln in lines if ln]
    assert "balance leastconn" in lines
    assert "option httpchk" in lines
    send = [ln for ln in lines if ln.startswith("http-check send")]
    assert send and "uri /ready" in send[0] and "meth GET" in send[0], send
    assert "http-check expect status 200" in lines
    timeouts = dict(re.match(r"timeout (\S+) (\S+)", ln).groups() for ln in lines
                    if ln.startswith("timeout "))

    def secs(v):
        n, u = re.match(r"(\d+)(ms|s|m|h|d)?$", v).groups()
        return int(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 0.001}[u]

    for t in ("server", "client", "tunnel"):
        assert secs(timeouts[t]) >= 600, (t, timeouts[t])
    # idle keep-alive below the daemon's 75 s, so the daemon never closes first
    assert secs(timeouts["http-keep-alive"]) < 75
    assert not any("shutdown-sessions" in ln for ln in lines), \
        "a replica marked down by /ready must keep its streams"
    assert not any(ln.startswith("compression") for ln in lines)
    assert "option http-no-delay" in lines, "SSE events would wait to be merged"
    assert "option http-buffer-request" in lines, "a POST could not be replayed"
    assert any(ln.startswith("retry-on") and "503" in ln and "conn-failure" in ln
               for ln in lines)
    servers = [ln for ln in lines if ln.startswith("server ")]
    assert len(servers) >= 2
    assert all(ln.split()[2].endswith(f":{daemon_default_port()}") for ln in servers)
    assert any(ln.startswith("default-server") and "check" in ln.split() for ln in lines)


@pytest.mark.skipif(_which("haproxy") is None,
                    reason="haproxy is not installed (deploy/setup.sh installs it)")
def test_haproxy_accepts_the_config():
    r = subprocess.run([_which("haproxy"), "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[WARNING]" not in r.stdout + r.stderr, r.stdout + r.stderr


# -------------------------------------------------------------- Docker

class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined, by
    stage."""

    def __init__(self, path):
        text = re.sub(r"\\\n", " ", path.read_text())
        self.instructions = []
        for ln in text.splitlines():
            ln = ln.strip()
            if not ln or ln.startswith("#"):
                continue
            op, _, rest = ln.partition(" ")
            self.instructions.append((op.upper(), rest.strip()))
        self.args = {}
        for op, rest in self.instructions:
            if op == "ARG" and "=" in rest:
                k, v = rest.split("=", 1)
                self.args.setdefault(k, v)
        self.stages = []        # [(image, name, [(op, rest)])]
        for op, rest in self.instructions:
            if op == "FROM":
                m = re.match(r"(\S+)(?: AS (\S+))?$", rest, re.I)
                image = re.sub(r"\$\{(\w+)\}", lambda mm: self.args[mm.group(1)], m.group(1))
                self.stages.append((image, m.group(2), []))
            elif self.stages:
                self.stages[-1][2].append((op, rest))

    def final(self):
        return self.stages[-1][2]

    def ops(self, op, stage=None):
        ins = self.final() if stage is None else stage
        return [rest for o, rest in ins if o == op]


DOCKERFILES = {"Dockerfile": ("debian:bookworm", "debian:bookworm-slim"),
               "Dockerfile.cuda": ("nvidia/cuda:", "nvidia/cuda:")}


def meson_install_path(prefix):
    """Where `meson install` puts the inferd executable for this prefix:
    from the local build's own introspection when there is one (it names
    the bindir it was configured with), else the default bindir, bin."""
    bindir = "bin"
    build = ROOT / "build"
    meson = shutil.which("meson")
    if meson and (build / "meson-info").exists():
        opts = json.loads(subprocess.run([meson, "introspect", "--buildoptions", str(build)],
                                         capture_output=True, text=True, check=True).stdout)
        bindir = next(o["value"] for o in opts if o["name"] == "bindir")
        installed = json.loads(subprocess.run([meson, "introspect", "--installed", str(build)],
                                              capture_output=True, text=True, check=True).stdout)
        local_prefix = next(o["value"] for o in opts if o["name"] == "prefix")
        assert installed.get(str(build / "inferd")) == f"{local_prefix}/{bindir}/inferd", \
            "meson does not install the inferd executable into bindir"
    return f"{prefix}/{bindir}/inferd"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile(name):
    df = Dockerfile(DEPLOY / "docker" / name)
    build_base, runtime_base = DOCKERFILES[name]
    build = [s for s in df.stages if s[1] == "build"]
    assert len(build) == 1, [s[:2] for s in df.stages]
    assert build[0][0].startswith(build_base), build[0][0]
    runtime_image = df.stages[-1][0]
    assert runtime_image.startswith(runtime_base), runtime_image
    if name == "Dockerfile.cuda":
        assert "-runtime-" in runtime_image and "-devel-" in build[0][0]
    # built with meson, installed into a staging directory, copied out
    run = " ".join(df.ops("RUN", build[0][2]))
    setup = re.search(r"meson setup (\S+) ([^&]*)", run)
    assert setup, run
    prefix = re.search(r"--prefix=(\S+)", setup.group(2)).group(1)
    destdir = re.search(r"meson install -C \S+ --destdir (\S+)", run).group(1)
    want = meson_install_path(prefix)
    copies = [c.split() for c in df.ops("COPY") if c.startswith("--from=build")]
    assert copies == [["--from=build", destdir + want, want]], copies
    assert df.ops("ENTRYPOINT") == [json.dumps([want])]
    # not root
    users = df.ops("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    # the port, the command and the health check agree with the daemon
    port = daemon_default_port()
    assert df.ops("EXPOSE") == [str(port)]
    cmd = json.loads(df.ops("CMD")[-1])
    assert cmd[0] == "serve" and cmd[cmd.index("--port") + 1] == str(port)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    hc = df.ops("HEALTHCHECK")
    assert len(hc) == 1 and f"/dev/tcp/127.0.0.1/{port}" in hc[0] and "GET /health " in hc[0]
    assert "/health" in daemon_routes()
    # the model is a volume, not in the image
    assert df.ops("VOLUME") and "/models" in df.ops("VOLUME")[0]
    assert any(e.startswith("INFERD_MODEL=/models/") for e in df.ops("ENV"))
    # the build context keeps what meson needs
    ignore = (DEPLOY / "docker" / f"{name}.dockerignore").read_text().split()
    for d in ("meson.build", "server", "engine", "kernels", "tests", "systemd"):
        assert d not in ignore and (ROOT / d).exists(), d


def healthcheck_command(name="Dockerfile"):
    """The HEALTHCHECK's exec form, as a list (for the integration test
    that runs it against a live daemon)."""
    hc = Dockerfile(DEPLOY / "docker" / name).ops("HEALTHCHECK")[0]
    return json.loads(hc[hc.index("CMD") + 3:].strip())


def runtime_packages(name="Dockerfile"):
    run = " ".join(Dockerfile(DEPLOY / "docker" / name).ops("RUN"))
    m = re.search(r"apt-get install -y --no-install-recommends ([^&]+)", run)
    return set(m.group(1).split())


@pytest.mark.skipif(not (ROOT / "build" / "inferd").exists() or _which("ldd") is None
                    or _which("dpkg") is None, reason="needs build/inferd, ldd and dpkg")
def test_the_runtime_image_has_every_library_the_binary_links():
    out = subprocess.run(["ldd", str(ROOT / "build" / "inferd")], capture_output=True,
                         text=True, check=True).stdout
    libs = re.findall(r"=> (/\S+)", out)
    assert libs
    # in every Debian image (apt itself needs them)
    base = {"libc6", "libgcc-s1", "libstdc++6"}
    want = runtime_packages()
    for lib in libs:
        if lib.startswith("/usr/local/cuda"):
            continue        # a CUDA build here; Dockerfile's build is -Dcuda=disabled
        pkg = None
        for path in (lib, str(pathlib.Path(lib).resolve())):
            r = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
            if r.returncode == 0:
                pkg = r.stdout.split(":")[0]
                break
        if pkg is None:
            continue        # not from a Debian package (a local build of something)
        assert pkg in want | base, f"{lib} comes from {pkg}, which the runtime image lacks"
