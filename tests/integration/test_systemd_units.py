"""The units in systemd/: what systemd-analyze says of them (verify, and
security's exposure score), the hardening they promise, that their
environment file example documents every variable they read, that
`meson install --destdir` puts the binary and the units where they belong,
and the property inferd.socket exists for: the daemon, started by the
unit's own ExecStart line on a socket the supervisor holds, is killed
(SIGKILL), clients connect while it is down, a new daemon is started on the
same socket, and every one of them is served; none is refused.

No systemd runs here (it is not PID 1): the test plays the supervisor, as
test_server_systemd.py does, handing the socket over as fd 3 with
LISTEN_FDS/LISTEN_PID and reading sd_notify's datagrams."""
import ctypes
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from inferd_serve_harness import BUILD, CHATML, EXE, ROOT, TINY, http_request
from test_server_systemd import recv_until

UNITS = ROOT / "systemd"
SERVICES = ["inferd.service", "inferd@.service"]
ENV_EXAMPLE = UNITS / "inferd.env.example"
# Read by the daemon or CUDA from the environment, not by the units' lines.
READ_FROM_ENV = {"INFERD_API_KEY", "CUDA_VISIBLE_DEVICES"}
# Specifiers of a system unit, as systemd expands them.
SPECIFIERS = {"%S": "/var/lib", "%C": "/var/cache", "%%": "%"}


# ------------------------------------------------------------ unit files

def parse_unit(path):
    """[(section, key, value)] in file order: continuation lines joined, as
    systemd joins them (the backslash becomes a space)."""
    out, section, pending = [], None, ""
    for n, raw in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
        if raw.lstrip()[:1] in ("#", ";"):
            continue  # a comment, even inside a continued line
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        s = line.strip()
        if not s:
            continue
        if s.startswith("["):
            assert s.endswith("]"), f"{path}:{n}: bad section header {s!r}"
            section = s[1:-1]
            continue
        assert "=" in s and section, f"{path}:{n}: not Key=Value in a section: {s!r}"
        k, v = s.split("=", 1)
        out.append((section, k.strip(), v.strip()))
    assert not pending, f"{path}: ends with a continuation"
    return out


def values(unit, key, section="Service"):
    return [v for s, k, v in unit if s == section and k == key]


def value(unit, key, section="Service"):
    vs = values(unit, key, section)
    assert len(vs) == 1, f"{key}= set {len(vs)} times in [{section}]"
    return vs[0]


def expand_specifiers(s, instance=""):
    return re.sub(r"%[SCi%]", lambda m: instance if m.group(0) == "%i" else SPECIFIERS[m.group(0)], s)


def environment(unit, instance=""):
    """The Environment= defaults of a unit, specifiers expanded."""
    env = {}
    for v in values(unit, "Environment"):
        for assignment in shlex.split(v):
            k, val = assignment.split("=", 1)
            env[k] = expand_specifiers(val, instance)
    return env


def exec_argv(line, env):
    """ExecStart's argv as systemd builds it: ${X} is replaced in place and
    stays one argument; $X alone as a word splits at whitespace into zero
    or more."""
    argv = []
    for word in line.split():
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            argv += env.get(m.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))
    return argv


def exec_variables(line):
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", line))


def env_example():
    """VAR -> the value its (commented) line gives, from inferd.env.example."""
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.fullmatch(r"#?([A-Z_][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def seconds(span):
    m = re.fullmatch(r"(\d+)\s*(ms|s|min|h)?", span)
    assert m, f"cannot read time span {span!r}"
    return int(m.group(1)) * {"ms": 1e-3, "s": 1, None: 1, "min": 60, "h": 3600}[m.group(2)]


def serve_flags():
    out = subprocess.run([str(EXE), "serve", "--help"], capture_output=True, text=True,
                         timeout=10)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"--[a-z][a-z-]+", out.stdout)) | {"--help"}


# ------------------------------------------------------- the directives

def test_units_parse_and_their_variables_are_documented():
    example = env_example()
    for name in SERVICES:
        unit = parse_unit(UNITS / name)
        line = value(unit, "ExecStart")
        used = exec_variables(line) | set(environment(unit))
        missing = used - set(example)
        assert not missing, f"{name} uses {sorted(missing)}; inferd.env.example does not say"
        # every flag it passes exists
        flags = set(re.findall(r"--[a-z][a-z-]+", line))
        assert flags <= serve_flags(), flags - serve_flags()
    base = parse_unit(UNITS / "inferd.service")
    template = parse_unit(UNITS / "inferd@.service")
    used = set()
    for unit in (base, template):
        used |= exec_variables(value(unit, "ExecStart")) | set(environment(unit))
    extra = set(example) - used - READ_FROM_ENV
    assert not extra, f"inferd.env.example documents {sorted(extra)}, which nothing reads"
    # the example's defaults are the unit's
    for k, v in environment(base).items():
        if v:
            assert example[k] == v, f"{k}: inferd.service says {v!r}, the example {example[k]!r}"
    # as are the figures its comments quote
    text = ENV_EXAMPLE.read_text()
    stop = re.search(r"TimeoutStopSec= \((\d+) s in the units\)", text)
    nofile = re.search(r"LimitNOFILE= \((\d+) in the units\)", text)
    assert stop and nofile
    for unit in (base, template):
        assert seconds(value(unit, "TimeoutStopSec")) == int(stop.group(1))
        assert int(value(unit, "LimitNOFILE")) == int(nofile.group(1))
    # the example's own flags exist too
    assert set(re.findall(r"--[a-z][a-z-]+", text)) <= serve_flags()
    socket_unit = parse_unit(UNITS / "inferd.socket")
    assert {s for s, _, _ in socket_unit} == {"Unit", "Socket", "Install"}


# The sandbox both services share, line for line.
SANDBOX = {
    "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
    "SystemCallArchitectures": "native", "DevicePolicy": "closed",
    "MemoryDenyWriteExecute": "no", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
    "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
}


@pytest.mark.parametrize("name", SERVICES)
def test_service_lifecycle_and_hardening(name):
    unit = parse_unit(UNITS / name)
    env = environment(unit, "gpu0")
    assert value(unit, "Type") == "notify"
    assert value(unit, "NotifyAccess") == "main"
    assert value(unit, "Restart") == "on-failure"
    assert value(unit, "KillSignal") == "SIGTERM"
    # the daemon pings every WatchdogSec/2 while its engine progresses;
    # the interval must outlast an engine step by far
    assert seconds(value(unit, "WatchdogSec")) >= 10
    drain = float(env["INFERD_DRAIN_TIMEOUT"])
    # the drain, then 5 s for cancelled requests to end, then unloading
    assert seconds(value(unit, "TimeoutStopSec")) >= drain + 5 + 10
    # one descriptor per connection, and as many again for the rest
    assert int(value(unit, "LimitNOFILE")) >= 2 * int(env["INFERD_MAX_CONNECTIONS"])
    assert "/etc/inferd/inferd.env" in [f.lstrip("-") for f in values(unit, "EnvironmentFile")]
    assert value(unit, "StateDirectory") == "inferd"
    assert value(unit, "CacheDirectory") == "inferd"
    for k, v in SANDBOX.items():
        assert value(unit, k) == v, f"{name}: {k}={value(unit, k)!r}, want {v!r}"
    assert not values(unit, "PrivateDevices"), "PrivateDevices= hides the GPUs"
    # MemoryDenyWriteExecute is off on purpose, and the unit says why
    text = (UNITS / name).read_text()
    assert re.search(r"#[^\n]*\n(#[^\n]*\n)*MemoryDenyWriteExecute=no", text)
    filters = values(unit, "SystemCallFilter")
    assert filters[0] == "@system-service" and all(f.startswith("~") for f in filters[1:])
    families = set(value(unit, "RestrictAddressFamilies").split())
    # AF_NETLINK only where NCCL may run (getifaddrs)
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"} | (
        {"AF_NETLINK"} if name == "inferd@.service" else set())
    allowed = [v.split() for v in values(unit, "DeviceAllow")]
    # the GPUs; the template also the NICs NCCL uses between nodes
    nic = ("infiniband",) if name == "inferd@.service" else ()
    assert allowed and all(len(a) == 2 and a[1] == "rw" and
                           any(k in a[0] for k in ("nvidia",) + nic) for a in allowed)
    if name == "inferd@.service":
        assert value(unit, "LimitMEMLOCK") == "infinity"  # NCCL over InfiniBand/RoCE
    devices = {a[0] for a in allowed}
    assert {"char-nvidia-frontend", "/dev/nvidiactl", "/dev/nvidia-uvm"} <= devices
    argv = exec_argv(value(unit, "ExecStart"), env)
    assert argv[:3] == ["/usr/local/bin/inferd", "serve", env["INFERD_MODEL"]]
    if name == "inferd@.service":
        assert "/etc/inferd/%i.env" in values(unit, "EnvironmentFile")
        assert env["INFERD_DEVICE"] == "cuda"


def test_socket_unit():
    unit = parse_unit(UNITS / "inferd.socket")
    assert value(unit, "ListenStream", "Socket") == "127.0.0.1:8000"
    assert value(unit, "Accept", "Socket") == "no"
    assert value(unit, "Service", "Socket") == "inferd.service"
    assert int(value(unit, "Backlog", "Socket")) >= 1024
    service = parse_unit(UNITS / "inferd.service")
    # the socket must outlive the service's restarts
    for k in ("PartOf", "BindsTo"):
        assert not values(unit, k, "Unit")
    assert "inferd.socket" in value(service, "Wants", "Unit").split()
    # the sandbox's address families must fit the socket's
    families = value(service, "RestrictAddressFamilies").split()
    assert "AF_INET" in families


# ------------------------------------------------------- meson install

def meson_option(name):
    opts = json.loads(subprocess.run(["meson", "introspect", str(BUILD), "--buildoptions"],
                                     capture_output=True, text=True, check=True,
                                     timeout=60).stdout)
    return next(o["value"] for o in opts if o["name"] == name)


def systemd_unit_dir():
    out = subprocess.run(["pkg-config", "--variable=systemdsystemunitdir", "systemd"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() \
        else "/lib/systemd/system"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`meson install --destdir` of the existing build: (destdir, the
    binary's path, the unit directory), both paths as installed."""
    if not shutil.which("meson"):
        pytest.skip("meson not on PATH")
    if not (BUILD / "build.ninja").exists():
        pytest.fail(f"{BUILD} is not configured: run deploy/setup.sh")
    dest = tmp_path_factory.mktemp("destdir")
    out = subprocess.run(["meson", "install", "-C", str(BUILD), "--destdir", str(dest),
                          "--no-rebuild", "--quiet"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    prefix, bindir = pathlib.Path(meson_option("prefix")), meson_option("bindir")
    return dest, prefix / bindir / "inferd", pathlib.Path(systemd_unit_dir()), prefix


def under(dest, path):
    return dest / pathlib.Path(path).relative_to("/")


def test_meson_install_puts_binary_and_units_in_place(installed):
    dest, exe, unit_dir, prefix = installed
    assert os.access(under(dest, exe), os.X_OK), f"{exe} not installed"
    out = subprocess.run([str(under(dest, exe)), "--version"], capture_output=True, text=True,
                         timeout=10)
    assert out.returncode == 0 and out.stdout.startswith("inferd "), out.stdout + out.stderr
    # meson drops build rpaths at install: the CUDA libraries' must stay
    if shutil.which("readelf"):
        def runpath(path):
            d = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
            return re.findall(r"R(?:UN)?PATH\).*\[(.*)\]", d)
        kept = set(":".join(runpath(under(dest, exe))).split(":"))
        wanted = {p for p in ":".join(runpath(EXE)).split(":")
                  if p.startswith("/") and not p.startswith(str(ROOT))}
        assert wanted <= kept, f"installed RUNPATH {kept} lacks {wanted - kept}"
    for name in ("inferd.service", "inferd@.service", "inferd.socket"):
        path = under(dest, unit_dir / name)
        assert path.exists(), (f"{unit_dir / name} not installed: is {BUILD} configured "
                               f"since systemd/meson.build? (ninja -C {BUILD})")
        if name.endswith(".service"):
            # ExecStart names the binary where it was installed
            argv = value(parse_unit(path), "ExecStart").split()
            assert argv[0] == str(exe), argv[0]
        else:
            assert path.read_text() == (UNITS / name).read_text()
    assert under(dest, prefix / "share" / "doc" / "inferd" / "inferd.env.example").exists()


def test_systemd_analyze(installed, tmp_path):
    """systemd-analyze verify on the installed units (ExecStart pointed at the
    DESTDIR's binary, the template as an instance), with nothing to say; and
    `security --offline` rates both services' exposure low."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package); the "
                    "directives were checked by parsing in the tests above")
    dest, exe, unit_dir, _ = installed
    for name in ("inferd.service", "inferd@.service", "inferd.socket"):
        text = under(dest, unit_dir / name).read_text()
        (tmp_path / name).write_text(text.replace(str(exe), str(under(dest, exe))))
    shutil.copy(tmp_path / "inferd@.service", tmp_path / "inferd@gpu0-3.service")
    paths = [str(tmp_path / n) for n in ("inferd.socket", "inferd.service",
                                         "inferd@gpu0-3.service")]
    out = subprocess.run([analyze, "verify", "--man=no", *paths], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    said = (out.stdout + out.stderr).strip()
    if "sysinit.target not found" in said:
        pytest.skip(f"systemd-analyze cannot see systemd's own units here: {said}")
    assert out.returncode == 0 and not said, said
    for name in ("inferd.service", "inferd@gpu0-3.service"):
        out = subprocess.run([analyze, "security", "--offline=yes", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
        assert m, out.stdout[-2000:] + out.stderr
        print(f"systemd-analyze security {name}: exposure {m.group(1)}")
        assert float(m.group(1)) <= 2.5, out.stdout


# ------------------------------------------- the socket across restarts

class Supervisor:
    """Plays systemd for inferd.socket and inferd.service: holds the
    listening socket, starts the daemon with the unit's ExecStart line and
    the socket as fd 3, and reads READY/STOPPING on $NOTIFY_SOCKET."""

    def __init__(self, tmp_path, extra_args=()):
        self.tmp = tmp_path
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.notify_path = str(tmp_path / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        unit = parse_unit(UNITS / "inferd.service")
        self.watchdog_usec = int(seconds(value(unit, "WatchdogSec")) * 1e6)
        env = environment(unit)
        env.update(INFERD_MODEL=str(TINY), CUDA_CACHE_PATH=str(tmp_path / "cuda"),
                   # the port in use: a daemon that ignored the socket and
                   # bound $INFERD_PORT would fail to start
                   INFERD_PORT=str(self.port),
                   INFERD_ARGS=" ".join(["--chat-template", str(CHATML), "--threads", "2",
                                         "--served-model-name", "tiny", *extra_args]))
        self.env = env
        self.argv = exec_argv(value(unit, "ExecStart"), env)
        self.argv[0] = str(EXE)
        self.procs = []

    def start(self, preexec=None, timeout=60):
        lfd = self.listener.fileno()

        def child():  # what systemd does between fork and exec
            if lfd != 3:
                os.dup2(lfd, 3)
            else:
                os.set_inheritable(3, True)
            if preexec:
                preexec()

        env = dict(os.environ, **self.env, LISTEN_FDS="1", LISTEN_FDNAMES="inferd.socket",
                   NOTIFY_SOCKET=self.notify_path, WATCHDOG_USEC=str(self.watchdog_usec))
        env.pop("INFERD_API_KEY", None)
        log = open(self.tmp / f"serve-{len(self.procs)}.log", "wb")
        # LISTEN_PID and WATCHDOG_PID name the daemon: the shell exports its
        # own pid, then becomes inferd
        p = subprocess.Popen(["sh", "-c", 'export LISTEN_PID=$$ WATCHDOG_PID=$$; exec "$@"', "sh",
                              *self.argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, close_fds=False, preexec_fn=child)
        log.close()
        self.procs.append(p)
        try:
            recv_until(self.notify, "READY=1", timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n$ {shlex.join(self.argv)}\n"
                                 f"{self.log(len(self.procs) - 1)[-3000:]}") from None
        return p

    def log(self, i):
        return (self.tmp / f"serve-{i}.log").read_text(errors="replace")

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        self.listener.close()
        self.notify.close()


def completion_request():
    return http_request("POST", "/v1/completions",
                        {"model": "tiny", "prompt": "hello", "max_tokens": 4},
                        headers={"Connection": "close"})


def read_response(sock, timeout):
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


@pytest.fixture
def supervisor(tmp_path):
    sup = Supervisor(tmp_path)
    yield sup
    sup.close()


def test_restart_on_the_socket_refuses_no_connection(supervisor):
    sup = supervisor
    first = sup.start()
    with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as c:
        c.sendall(completion_request())
        status, body = read_response(c, 30)
    assert status.startswith("HTTP/1.1 200"), status
    assert "listening on 1 socket(s) from systemd" in sup.log(0), sup.log(0)[-2000:]

    # the daemon dies (kill -9: no drain, no STOPPING=1); the socket is ours
    first.kill()
    assert first.wait(10) == -signal.SIGKILL
    down_at = time.monotonic()
    waiting = []
    for _ in range(8):
        # the kernel completes the handshake into the backlog: connected,
        # not refused, though no daemon runs
        c = socket.create_connection(("127.0.0.1", sup.port), timeout=2)
        c.sendall(completion_request())
        waiting.append(c)

    # Restart=on-failure: a new daemon on the same socket
    sup.start()
    restarted = time.monotonic() - down_at
    for c in waiting:
        with c:
            status, body = read_response(c, 30)
        assert status.startswith("HTTP/1.1 200"), (status, body[:300])
        answer = json.loads(body)
        assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] >= 1
    print(f"{len(waiting)} connections made while no daemon ran, all served after a "
          f"{restarted:.1f} s restart")

    # SIGTERM: STOPPING=1 and a clean exit, as systemctl stop gets
    second = sup.procs[-1]
    second.send_signal(signal.SIGTERM)
    recv_until(sup.notify, "STOPPING=1", 10)
    assert second.wait(30) == 0, sup.log(1)[-2000:]

    # what the socket unit prevents: with nobody holding the socket, the
    # same gap refuses
    sup.listener.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sup.port), timeout=2).close()


def test_cpu_daemon_runs_with_write_xor_execute(supervisor):
    """MemoryDenyWriteExecute= is off in the units for the NVIDIA driver's
    sake; the rest of the process keeps to W^X: the CPU daemon serves under
    the kernel's equivalent (PR_SET_MDWE, Linux 6.3+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
    if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0:
        pytest.skip(f"no PR_SET_MDWE in this kernel ({os.uname().release})")

    def mdwe():
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            os._exit(70)

    # the filter holds: a W+X mapping is refused
    probe = subprocess.run([sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
                           preexec_fn=mdwe, capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
    p = supervisor.start(preexec=mdwe)
    with socket.create_connection(("127.0.0.1", supervisor.port), timeout=10) as c:
        c.sendall(completion_request())
        status, body = read_response(c, 30)
    assert status.startswith("HTTP/1.1 200"), (status, body[:300])
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0, supervisor.log(0)[-2000:]
