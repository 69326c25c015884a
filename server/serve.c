/* serve.c: `inferd serve`: the daemon. Flags, loading, the event loop and
 * the process lifecycle: systemd readiness and watchdog (sd_notify),
 * socket activation (LISTEN_FDS), and the SIGTERM drain.
 *
 * Start: load the model and tokenizer, start the engine, listen, then tell
 * systemd READY=1. Run: the libevent loop on the main thread. Stop: on
 * SIGTERM (or SIGINT) stop accepting, turn /ready to 503 and tell systemd
 * STOPPING=1; streams in flight run to their end for up to
 * --drain-timeout seconds, then whatever is left is cancelled; exit 0. A
 * second signal stops at once. The watchdog ping is sent only while the
 * engine makes progress, so systemd restarts a daemon whose engine hangs.
 * Main thread.
 */
#include <errno.h>
#include <event2/event.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "server/api.h"
#include "server/cli.h"
#include "server/http.h"
#include "server/log.h"
#include "server/model_text.h"

#define SERVE_MAX_KEYS 64

struct serve_args {
    const char *model;
    const char *host;
    int64_t port;
    const char *served_name;
    const char *keys[SERVE_MAX_KEYS];
    int n_keys;
    const char *key_file;
    const char *tls_cert, *tls_key;
    const char *chat_template;
    int trust_template;
    int64_t threads;
    int64_t kv_bytes, max_seqs, max_batched, max_queue, max_model_len;
    double drain_timeout;
    struct http_limits lim;
    int64_t max_prompt_bytes;
    double ping_interval;
    int device, deterministic, enforce_eager, async_sched;
    int64_t tp, nnodes, node_rank, master_port;
    const char *master_addr;
    double gpu_util;
};

struct serve {
    struct event_base *base;
    struct api *api;
    struct http_server *http;
    struct engine *engine;
    struct event *sig_term, *sig_int, *sig_hup, *drain_ev, *watchdog_ev;
    double drain_deadline;
    int draining, cancelled, signals;
    double drain_timeout;
    double watchdog_s;
};

/* ---------------------------------------------------------------- systemd */

/* Sends state to the service manager (sd_notify(3)'s protocol: one
 * datagram on $NOTIFY_SOCKET). Silent when not run by systemd. */
static void notify(const char *state)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path)
        return;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t len = strlen(path);
    if (len >= sizeof(sa.sun_path) || (path[0] != '/' && path[0] != '@'))
        return;
    memcpy(sa.sun_path, path, len);
    if (path[0] == '@')
        sa.sun_path[0] = 0; /* abstract namespace */
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    socklen_t sl = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
    if (sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa, sl) < 0)
        log_warn("sd_notify %s: %s", state, strerror(errno));
    close(fd);
}

/* Sockets systemd passed (socket activation): their count, 0 when none. */
static int listen_fds(void)
{
    const char *pid = getenv("LISTEN_PID"), *n = getenv("LISTEN_FDS");
    if (!pid || !n || atol(pid) != (long)getpid())
        return 0;
    long k = atol(n);
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    return k > 0 && k < 64 ? (int)k : 0;
}

/* ------------------------------------------------------------- lifecycle */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void on_drain_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct serve *s = arg;
    int live = api_live_requests(s->api);
    double now = now_s();
    /* Done when no request is live and every answer has left: a finished
     * response may still sit in a connection's output buffer (a slow
     * reader, a large body), and closing now would cut it. */
    size_t queued = live == 0 ? http_server_pending_output(s->http) : 0;
    if (live == 0 && queued == 0) {
        log_info("drained; exiting");
        event_base_loopexit(s->base, NULL);
        return;
    }
    if (live == 0) {
        if (now >= s->drain_deadline) {
            log_warn("drain timeout: %zu bytes of answers not yet read by their clients; "
                     "exiting anyway", queued);
            event_base_loopexit(s->base, NULL);
        }
        return;
    }
    if (!s->cancelled && now >= s->drain_deadline) {
        log_warn("drain timeout: cancelling %d requests still in flight", live);
        api_cancel_all(s->api);
        s->cancelled = 1;
        s->drain_deadline = now + 5; /* cancellation takes one step */
    } else if (s->cancelled && now >= s->drain_deadline) {
        log_warn("%d requests did not finish after cancellation; exiting anyway", live);
        event_base_loopexit(s->base, NULL);
    }
}

static void on_stop_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    struct serve *s = arg;
    if (s->draining) {
        log_warn("signal %d again: stopping now", (int)sig);
        api_cancel_all(s->api);
        event_base_loopexit(s->base, NULL);
        return;
    }
    s->draining = 1;
    log_info("signal %d: draining (no new connections; %d requests in flight, up to %.0f s)",
             (int)sig, api_live_requests(s->api), s->drain_timeout);
    notify("STOPPING=1\nSTATUS=draining");
    api_set_draining(s->api);
    http_server_drain(s->http);
    s->drain_deadline = now_s() + s->drain_timeout;
    struct timeval tick = {0, 100000};
    if (event_add(s->drain_ev, &tick))
        event_base_loopexit(s->base, NULL);
    on_drain_tick(-1, 0, s);
}

static void on_hup(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    (void)arg;
    /* Logs go to stderr (journald, or whatever the supervisor set up):
     * there is no file of our own to reopen. */
    log_info("SIGHUP: logging to stderr; nothing to reopen");
}

static void on_watchdog(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct serve *s = arg;
    /* No ping while the engine has work and its steps stand still:
     * systemd then restarts a wedged daemon. */
    if (api_engine_healthy(s->api, s->watchdog_s))
        notify("WATCHDOG=1");
    else
        log_error("the engine made no progress for %.0f s; withholding the watchdog ping",
                  s->watchdog_s);
}

/* -------------------------------------------------------------- flags */

static void usage(FILE *f)
{
    fputs("usage: inferd serve [MODEL] [options]\n"
          "\n"
          "Serves MODEL (a .gguf file or a Hugging Face directory; default $INFERD_MODEL,\n"
          "else the model deploy/setup.sh installs) over the OpenAI REST API.\n"
          "\n"
          "network:\n"
          "  --host H                   address to listen on (default 127.0.0.1)\n"
          "  --port P                   port (default 8000; 0 picks a free one)\n"
          "  --tls-cert F --tls-key F   serve HTTPS (TLS 1.2+) with this PEM chain and key\n"
          "  --api-key K                require 'Authorization: Bearer K' (repeatable;\n"
          "                             also $INFERD_API_KEY)\n"
          "  --api-key-file F           keys, one per line ('#' comments)\n"
          "model:\n"
          "  --served-model-name N      the model id clients name (default: file name)\n"
          "  --chat-template F          a Jinja chat template instead of the model's own\n"
          "  --trust-request-chat-template  accept 'chat_template' in requests\n"
          "  --threads N                CPU threads for the model (default: all cores)\n"
          "  --device D                 cpu (default) or cuda: the first GPU, weights in bf16\n"
          "                             (builds with the CUDA toolkit; not yet run on a GPU)\n"
          "  --deterministic            GPU: batch-invariant kernels, so a request's output\n"
          "                             does not depend on its batch (the CPU always is)\n"
          "  --tensor-parallel-size N   split the model over N ranks, Megatron-style\n"
          "                             (CPU threads, or one GPU each with --device\n"
          "                             cuda; see inspect --tp)\n"
          "  --nnodes N, --node-rank R, --master-addr A, --master-port P\n"
          "                             multi-node tensor parallelism: node 0 serves and\n"
          "                             plans, nodes 1..N-1 run their ranks of its steps\n"
          "                             (the same command with --node-rank R)\n"
          "  --gpu-memory-utilization F GPU: fraction of its memory for weights, step\n"
          "                             buffers and KV cache together (default 0.9)\n"
          "  --enforce-eager            GPU: no CUDA graphs (each decode step's kernels\n"
          "                             are launched one by one)\n"
          "  --async-scheduling, --no-async-scheduling\n"
          "                             launch each decode step before the last one's\n"
          "                             tokens reach the host (default: on with a GPU)\n"
          "engine:\n"
          "  --kv-cache-memory SIZE     KV cache budget (default: half the free memory, <= 4G)\n"
          "  --max-seqs N               sequences resident at once (default 64)\n"
          "  --max-batched-tokens N     token rows per step (default 256)\n"
          "  --max-queue N              requests waiting before 503s (default 1024)\n"
          "  --max-model-len N          longest prompt + completion (default: the model's)\n"
          "limits:\n"
          "  --max-header-bytes N       request line + headers (default 16K) -> 431\n"
          "  --max-body-bytes N         request body (default 8M) -> 413\n"
          "  --max-prompt-bytes N       prompt text per request (default 1M) -> 400\n"
          "  --header-timeout S         to receive the headers (default 10) -> 408\n"
          "  --body-timeout S           between reads of a body (default 10) -> 408\n"
          "  --min-body-rate N          bytes/s a body must average once it has taken\n"
          "                             longer than --body-timeout (default 1024; 0: off)\n"
          "  --idle-timeout S           idle keep-alive connection (default 75)\n"
          "  --send-timeout S           client not reading (default 60): cancelled\n"
          "  --max-connections N        open connections (default 4096) -> 503\n"
          "  --max-stream-buffer N      output queued per connection (default 1M): cancelled\n"
          "  --sse-ping-interval S      ': ping' on a stream silent this long (default 15)\n"
          "lifecycle:\n"
          "  --drain-timeout S          on SIGTERM, let streams finish this long (default 30)\n"
          "  --log-level L              debug, info, warn or error (default info)\n",
          f);
}

static int parse_seconds(const char *flag, const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v > 0 && v <= 86400)) {
        cli_error("%s: expected seconds between 0 and 86400, got '%s'", flag, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int read_key_file(struct serve_args *a, char **buf)
{
    size_t len;
    *buf = mt_slurp(a->key_file, &len);
    if (!*buf) {
        cli_error("--api-key-file %s: %s", a->key_file, strerror(errno));
        return -1;
    }
    char *save = NULL;
    for (char *ln = strtok_r(*buf, "\n", &save); ln; ln = strtok_r(NULL, "\n", &save)) {
        while (*ln == ' ' || *ln == '\t')
            ln++;
        size_t l = strlen(ln);
        while (l && (ln[l - 1] == ' ' || ln[l - 1] == '\t' || ln[l - 1] == '\r'))
            ln[--l] = 0;
        if (!l || ln[0] == '#')
            continue;
        if (a->n_keys == SERVE_MAX_KEYS) {
            cli_error("--api-key-file %s: more than %d keys", a->key_file, SERVE_MAX_KEYS);
            return -1;
        }
        a->keys[a->n_keys++] = ln;
    }
    if (a->n_keys == 0) {
        cli_error("--api-key-file %s: no keys in the file", a->key_file);
        return -1;
    }
    return 0;
}

static int parse_args(int argc, char **argv, struct serve_args *a)
{
    enum { O_HOST = 256, O_PORT, O_NAME, O_KEY, O_KEYFILE, O_CERT, O_TLSKEY, O_TMPL, O_TRUST,
           O_THREADS, O_KV, O_SEQS, O_BATCH, O_QUEUE, O_MLEN, O_DRAIN, O_HDR, O_BODY, O_PROMPT,
           O_HTO, O_BTO, O_ITO, O_STO, O_CONNS, O_SBUF, O_PING, O_LOG, O_DEV, O_DET, O_GPUMEM, O_EAGER, O_ASYNC, O_NOASYNC, O_TP, O_NNODES, O_NODE, O_MADDR, O_MPORT, O_MINRATE, O_HELP };
    static const struct option opts[] = {
        {"host", required_argument, 0, O_HOST},
        {"port", required_argument, 0, O_PORT},
        {"served-model-name", required_argument, 0, O_NAME},
        {"api-key", required_argument, 0, O_KEY},
        {"api-key-file", required_argument, 0, O_KEYFILE},
        {"tls-cert", required_argument, 0, O_CERT},
        {"tls-key", required_argument, 0, O_TLSKEY},
        {"chat-template", required_argument, 0, O_TMPL},
        {"trust-request-chat-template", no_argument, 0, O_TRUST},
        {"threads", required_argument, 0, O_THREADS},
        {"kv-cache-memory", required_argument, 0, O_KV},
        {"max-seqs", required_argument, 0, O_SEQS},
        {"max-batched-tokens", required_argument, 0, O_BATCH},
        {"max-queue", required_argument, 0, O_QUEUE},
        {"max-model-len", required_argument, 0, O_MLEN},
        {"drain-timeout", required_argument, 0, O_DRAIN},
        {"max-header-bytes", required_argument, 0, O_HDR},
        {"max-body-bytes", required_argument, 0, O_BODY},
        {"max-prompt-bytes", required_argument, 0, O_PROMPT},
        {"header-timeout", required_argument, 0, O_HTO},
        {"body-timeout", required_argument, 0, O_BTO},
        {"min-body-rate", required_argument, 0, O_MINRATE},
        {"idle-timeout", required_argument, 0, O_ITO},
        {"send-timeout", required_argument, 0, O_STO},
        {"max-connections", required_argument, 0, O_CONNS},
        {"max-stream-buffer", required_argument, 0, O_SBUF},
        {"sse-ping-interval", required_argument, 0, O_PING},
        {"log-level", required_argument, 0, O_LOG},
        {"device", required_argument, 0, O_DEV},
        {"deterministic", no_argument, 0, O_DET},
        {"gpu-memory-utilization", required_argument, 0, O_GPUMEM},
        {"enforce-eager", no_argument, 0, O_EAGER},
        {"async-scheduling", no_argument, 0, O_ASYNC},
        {"tensor-parallel-size", required_argument, 0, O_TP},
        {"nnodes", required_argument, 0, O_NNODES},
        {"node-rank", required_argument, 0, O_NODE},
        {"master-addr", required_argument, 0, O_MADDR},
        {"master-port", required_argument, 0, O_MPORT},
        {"no-async-scheduling", no_argument, 0, O_NOASYNC},
        {"help", no_argument, 0, O_HELP},
        {0, 0, 0, 0},
    };
    memset(a, 0, sizeof(*a));
    a->host = "127.0.0.1";
    a->port = 8000;
    a->drain_timeout = 30;
    int c;
    int64_t v;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case O_HOST: a->host = optarg; break;
        case O_PORT: rc = cli_parse_int("--port", optarg, 0, 65535, &a->port); break;
        case O_NAME:
            if (!*optarg || strlen(optarg) > 256) {
                cli_error("--served-model-name: 1 to 256 bytes");
                rc = -1;
            }
            a->served_name = optarg;
            break;
        case O_KEY:
            if (a->n_keys == SERVE_MAX_KEYS) {
                cli_error("--api-key: at most %d keys", SERVE_MAX_KEYS);
                rc = -1;
            } else {
                a->keys[a->n_keys++] = optarg;
            }
            break;
        case O_KEYFILE: a->key_file = optarg; break;
        case O_CERT: a->tls_cert = optarg; break;
        case O_TLSKEY: a->tls_key = optarg; break;
        case O_TMPL: a->chat_template = optarg; break;
        case O_TRUST: a->trust_template = 1; break;
        case O_THREADS: rc = cli_parse_int("--threads", optarg, 1, 1024, &a->threads); break;
        case O_KV: rc = cli_parse_size("--kv-cache-memory", optarg, &a->kv_bytes); break;
        case O_SEQS: rc = cli_parse_int("--max-seqs", optarg, 1, 4096, &a->max_seqs); break;
        case O_BATCH:
            rc = cli_parse_int("--max-batched-tokens", optarg, 1, 1 << 20, &a->max_batched);
            break;
        case O_QUEUE: rc = cli_parse_int("--max-queue", optarg, 1, 1 << 20, &a->max_queue); break;
        case O_MLEN:
            rc = cli_parse_int("--max-model-len", optarg, 2, 1 << 24, &a->max_model_len);
            break;
        case O_DRAIN: rc = parse_seconds("--drain-timeout", optarg, &a->drain_timeout); break;
        case O_HDR:
            rc = cli_parse_size("--max-header-bytes", optarg, &v);
            a->lim.max_header_bytes = (size_t)v;
            break;
        case O_BODY:
            rc = cli_parse_size("--max-body-bytes", optarg, &v);
            a->lim.max_body_bytes = (size_t)v;
            break;
        case O_PROMPT: rc = cli_parse_size("--max-prompt-bytes", optarg, &a->max_prompt_bytes); break;
        case O_HTO: rc = parse_seconds("--header-timeout", optarg, &a->lim.header_timeout_s); break;
        case O_BTO: rc = parse_seconds("--body-timeout", optarg, &a->lim.body_timeout_s); break;
        case O_MINRATE: {
            int64_t v;
            rc = cli_parse_size("--min-body-rate", optarg, &v);
            a->lim.min_body_rate = v > 0 ? (double)v : -1;
            break;
        }
        case O_ITO: rc = parse_seconds("--idle-timeout", optarg, &a->lim.idle_timeout_s); break;
        case O_STO: rc = parse_seconds("--send-timeout", optarg, &a->lim.send_timeout_s); break;
        case O_CONNS:
            rc = cli_parse_int("--max-connections", optarg, 1, 1 << 20, &v);
            a->lim.max_connections = (int)v;
            break;
        case O_SBUF:
            rc = cli_parse_size("--max-stream-buffer", optarg, &v);
            a->lim.max_output_bytes = (size_t)v;
            break;
        case O_DEV: rc = cli_parse_device(optarg, &a->device); break;
        case O_DET: a->deterministic = 1; break;
        case O_EAGER: a->enforce_eager = 1; break;
        case O_ASYNC: a->async_sched = 1; break;
        case O_TP: rc = cli_parse_int("--tensor-parallel-size", optarg, 1, 64, &a->tp); break;
        case O_NNODES: rc = cli_parse_int("--nnodes", optarg, 1, 64, &a->nnodes); break;
        case O_NODE: rc = cli_parse_int("--node-rank", optarg, 0, 63, &a->node_rank); break;
        case O_MADDR: a->master_addr = optarg; break;
        case O_MPORT: rc = cli_parse_int("--master-port", optarg, 1, 65534, &a->master_port); break;
        case O_NOASYNC: a->async_sched = -1; break;
        case O_GPUMEM: {
            char *end = NULL;
            a->gpu_util = strtod(optarg, &end);
            if (!end || *end || end == optarg || !(a->gpu_util > 0 && a->gpu_util <= 1)) {
                cli_error("--gpu-memory-utilization: expected a fraction in (0, 1], got '%s'",
                          optarg);
                rc = -1;
            }
            break;
        }
        case O_PING: rc = parse_seconds("--sse-ping-interval", optarg, &a->ping_interval); break;
        case O_LOG: {
            int l = log_parse_level(optarg);
            if (l < 0) {
                cli_error("--log-level: expected debug, info, warn or error, got '%s'", optarg);
                rc = -1;
            } else {
                log_set_level((enum log_level)l);
            }
            break;
        }
        case O_HELP:
        case 'h': usage(stdout); exit(0);
        default: return 2;
        }
        if (rc)
            return 2;
    }
    if (optind < argc)
        a->model = argv[optind++];
    if (optind < argc) {
        cli_error("unexpected argument '%s'", argv[optind]);
        return 2;
    }
    if (!a->tls_cert != !a->tls_key) {
        cli_error("--tls-cert and --tls-key go together");
        return 2;
    }
    return 0;
}

/* The id clients name when --served-model-name is not given: the file or
 * directory name, without .gguf. */
static void default_name(const char *path, char *out, size_t n)
{
    size_t l = strlen(path);
    while (l > 1 && path[l - 1] == '/')
        l--;
    size_t b = l;
    while (b > 0 && path[b - 1] != '/')
        b--;
    size_t e = l;
    if (e - b > 5 && strncmp(path + e - 5, ".gguf", 5) == 0)
        e -= 5;
    snprintf(out, n, "%.*s", (int)(e - b), path + b);
}

int cli_serve(int argc, char **argv)
{
    struct serve_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc)
        return rc;
    struct serve s = {.drain_timeout = a.drain_timeout};
    struct model *model = NULL;
    struct tokenizer *tok = NULL;
    struct ssl_ctx_st *tls = NULL;
    char *tmpl = NULL, *key_buf = NULL, err[512], defbuf[4096], name[300];
    int status = 1;
    double t0 = now_s();

    signal(SIGPIPE, SIG_IGN);
    const char *env_key = getenv("INFERD_API_KEY");
    if (env_key && *env_key && a.n_keys < SERVE_MAX_KEYS)
        a.keys[a.n_keys++] = env_key;
    if (a.key_file && read_key_file(&a, &key_buf))
        return 2;
    const char *path = a.model ? a.model : mt_default_model(defbuf, sizeof(defbuf));
    default_name(path, name, sizeof(name));
    if (a.tls_cert && !(tls = http_tls_ctx_create(a.tls_cert, a.tls_key, err, sizeof(err)))) {
        cli_error("TLS: %s", err);
        goto done;
    }

    struct model_opts mo = {.n_threads = (int)a.threads, .device = a.device,
                            .deterministic = a.deterministic,
                            .enforce_eager = a.enforce_eager, .tp = (int)a.tp,
                            .nnodes = (int)a.nnodes, .node_rank = (int)a.node_rank,
                            .master_addr = a.master_addr, .master_port = (int)a.master_port};
    if (a.nnodes > 1 && !a.master_port) {
        cli_error("--nnodes %lld: --master-port is required (and --master-addr, unless the "
                  "leader is on this machine)", (long long)a.nnodes);
        goto done;
    }
    if (model_load(path, &mo, &model, err, sizeof(err))) {
        cli_error("%s", err);
        goto done;
    }
    if (a.nnodes > 1 && a.node_rank > 0) {
        /* a follower: no HTTP, only the leader's steps, until it stops */
        log_info("node %lld of %lld: running ranks of the leader's steps (%s:%lld)",
                 (long long)a.node_rank, (long long)a.nnodes,
                 a.master_addr ? a.master_addr : "127.0.0.1", (long long)a.master_port);
        notify("READY=1\nSTATUS=following");
        if (model_follow(model, err, sizeof(err))) {
            log_error("node %lld: %s", (long long)a.node_rank, err);
            goto done;
        }
        log_info("node %lld: the leader ended the job", (long long)a.node_rank);
        status = 0;
        goto done;
    }
    if (!(tok = mt_open_tokenizer(path, 1, &tmpl, err, sizeof(err)))) {
        cli_error("%s", err);
        goto done;
    }
    if (a.chat_template) {
        size_t len;
        free(tmpl);
        if (!(tmpl = mt_slurp(a.chat_template, &len))) {
            cli_error("--chat-template %s: %s", a.chat_template, strerror(errno));
            goto done;
        }
    }
    if (!tmpl)
        log_warn("the model has no chat template: /v1/chat/completions will refuse requests "
                 "(use --chat-template FILE)");

    if (!(s.base = event_base_new())) {
        cli_error("event_base_new failed");
        goto done;
    }
    struct api_opts ao = {
        .served_name = a.served_name ? a.served_name : name,
        .model = model,
        .tok = tok,
        .chat_template = tmpl,
        .trust_request_chat_template = a.trust_template,
        .api_keys = a.keys,
        .n_api_keys = a.n_keys,
        .max_prompt_bytes = a.max_prompt_bytes,
        .ping_interval_s = a.ping_interval,
    };
    if (!(s.api = api_create(&ao, s.base, err, sizeof(err)))) {
        cli_error("%s", err);
        goto done;
    }
    struct engine_opts eo = {
        .kv_cache_bytes = a.kv_bytes,
        .gpu_memory_utilization = a.gpu_util,
        .async_scheduling = (int)a.async_sched,
        .max_seqs = (int)a.max_seqs,
        .max_batched_tokens = a.max_batched,
        .max_queue = (int)a.max_queue,
        .max_model_len = a.max_model_len,
        .wake = api_engine_wake,
        .wake_arg = s.api,
    };
    if (!(s.engine = engine_create(model, &eo, err, sizeof(err)))) {
        cli_error("%s", err);
        goto done;
    }
    api_set_engine(s.api, s.engine);
    struct http_handler h = {api_on_request, api_on_abort, api_on_drain, s.api};
    if (!(s.http = http_server_create(s.base, &a.lim, &h, tls, err, sizeof(err)))) {
        cli_error("%s", err);
        goto done;
    }
    api_set_http(s.api, s.http);

    int n_fds = listen_fds();
    for (int i = 0; i < n_fds; i++)
        if (http_server_add_listener(s.http, 3 + i, err, sizeof(err))) {
            cli_error("socket %d from systemd: %s", 3 + i, err);
            goto done;
        }
    if (n_fds == 0) {
        int fd = http_listen_tcp(a.host, (int)a.port, 0, err, sizeof(err));
        if (fd < 0 || http_server_add_listener(s.http, fd, err, sizeof(err))) {
            cli_error("%s", err);
            goto done;
        }
    }

    s.sig_term = evsignal_new(s.base, SIGTERM, on_stop_signal, &s);
    s.sig_int = evsignal_new(s.base, SIGINT, on_stop_signal, &s);
    s.sig_hup = evsignal_new(s.base, SIGHUP, on_hup, &s);
    s.drain_ev = event_new(s.base, -1, EV_PERSIST, on_drain_tick, &s);
    if (!s.sig_term || !s.sig_int || !s.sig_hup || !s.drain_ev || event_add(s.sig_term, NULL) ||
        event_add(s.sig_int, NULL) || event_add(s.sig_hup, NULL)) {
        cli_error("cannot set up signal handling");
        goto done;
    }
    const char *wd = getenv("WATCHDOG_USEC"), *wd_pid = getenv("WATCHDOG_PID");
    if (wd && (!wd_pid || atol(wd_pid) == (long)getpid()) && atoll(wd) > 0) {
        s.watchdog_s = (double)atoll(wd) / 1e6;
        double half = s.watchdog_s / 2;
        struct timeval tv = {(time_t)half, (suseconds_t)((half - (double)(time_t)half) * 1e6)};
        s.watchdog_ev = event_new(s.base, -1, EV_PERSIST, on_watchdog, &s);
        if (!s.watchdog_ev || event_add(s.watchdog_ev, &tv)) {
            cli_error("cannot set up the watchdog timer");
            goto done;
        }
    }

    struct engine_limits lim;
    engine_get_limits(s.engine, &lim);
    api_set_ready(s.api, 1);
    if (n_fds)
        log_info("listening on %d socket(s) from systemd (%s)", n_fds, tls ? "https" : "http");
    else
        log_info("listening on %s://%s%s%s:%d", tls ? "https" : "http",
                 strchr(a.host, ':') ? "[" : "", a.host, strchr(a.host, ':') ? "]" : "",
                 http_server_port(s.http, 0));
    log_info("serving '%s' from %s: ready in %.2f s; max_model_len %lld, KV cache %lld tokens "
             "(%.2f GiB), max_seqs %d",
             ao.served_name, path, now_s() - t0, (long long)lim.max_model_len,
             (long long)lim.kv_tokens, (double)lim.kv_bytes / (1 << 30), lim.max_seqs);
    if (a.tp > 1 && a.device == MODEL_DEVICE_CUDA)
        log_info("tensor parallel: %lld ranks (GPUs 0..%lld, a thread each, summing through "
                 "NCCL)", (long long)a.tp, (long long)a.tp - 1);
    else if (a.tp > 1)
        log_info("tensor parallel: %lld ranks (threads of this process, summing through the "
                 "CPU communicator)", (long long)a.tp);
    notify("READY=1\nSTATUS=serving");

    event_base_dispatch(s.base);
    status = 0;
done:
    /* teardown mirrors construction: connections (aborting requests),
     * then the engine, then what it used */
    http_server_destroy(s.http);
    engine_destroy(s.engine);
    api_destroy(s.api);
    if (s.sig_term)
        event_free(s.sig_term);
    if (s.sig_int)
        event_free(s.sig_int);
    if (s.sig_hup)
        event_free(s.sig_hup);
    if (s.drain_ev)
        event_free(s.drain_ev);
    if (s.watchdog_ev)
        event_free(s.watchdog_ev);
    if (s.base)
        event_base_free(s.base);
    http_tls_ctx_destroy(tls);
    tokenizer_destroy(tok);
    model_destroy(model);
    free(tmpl);
    free(key_buf);
    if (status == 0)
        log_info("stopped");
    return status;
}
