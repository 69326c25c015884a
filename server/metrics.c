/* metrics.c: GET /metrics in Prometheus' text exposition format (0.0.4).
 *
 * Names follow vLLM's (prefix inferd: instead of vllm:, label model_name),
 * so a dashboard built for vLLM needs only the prefix changed: request
 * gauges, KV cache use, prefix cache and token counters, the latency
 * histograms, plus the HTTP layer's own counters. Event loop thread; the
 * engine's figures come from one consistent snapshot.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "server/api_internal.h"
#include "server/http.h"

struct mw {
    struct jw *w;
    char label[API_MAX_NAME_BYTES * 2 + 32]; /* model_name="..." */
};

static void line(struct mw *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void line(struct mw *m, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n > 0)
        jw_raw(m->w, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

static void head(struct mw *m, const char *name, const char *type, const char *help)
{
    line(m, "# HELP inferd:%s %s\n# TYPE inferd:%s %s\n", name, help, name, type);
}

static void gauge(struct mw *m, const char *name, const char *help, double v)
{
    head(m, name, "gauge", help);
    line(m, "inferd:%s{%s} %.17g\n", name, m->label, v);
}

static void counter(struct mw *m, const char *name, const char *help, uint64_t v)
{
    head(m, name, "counter", help);
    line(m, "inferd:%s{%s} %" PRIu64 "\n", name, m->label, v);
}

static void hist(struct mw *m, const char *name, const char *help, const struct engine_hist *h)
{
    head(m, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < h->n_bounds; i++) {
        cum += h->counts[i];
        line(m, "inferd:%s_bucket{%s,le=\"%.17g\"} %" PRIu64 "\n", name, m->label, h->bounds[i],
             cum);
    }
    cum += h->counts[h->n_bounds];
    line(m, "inferd:%s_bucket{%s,le=\"+Inf\"} %" PRIu64 "\n", name, m->label, cum);
    line(m, "inferd:%s_sum{%s} %.17g\n", name, m->label, h->sum);
    line(m, "inferd:%s_count{%s} %" PRIu64 "\n", name, m->label, cum);
}

void api_metrics(struct api *a, struct jw *out)
{
    struct mw m = {.w = out};
    /* label values escape backslash, quote and newline */
    size_t k = (size_t)snprintf(m.label, sizeof(m.label), "model_name=\"");
    for (const char *p = a->served_name; *p && k + 4 < sizeof(m.label); p++) {
        if (*p == '\\' || *p == '"' || *p == '\n')
            m.label[k++] = '\\';
        m.label[k++] = *p == '\n' ? 'n' : *p;
    }
    m.label[k++] = '"';
    m.label[k] = 0;

    struct engine_stats st;
    engine_get_stats(a->engine, &st);
    gauge(&m, "num_requests_running", "Requests with a sample in the KV cache.", st.running);
    gauge(&m, "num_requests_waiting", "Requests waiting for admission (preempted included).",
          st.waiting);
    gauge(&m, "kv_cache_usage_perc", "Fraction of KV cache blocks held by live sequences.",
          st.kv_blocks_total ? (double)st.kv_blocks_used / (double)st.kv_blocks_total : 0);
    head(&m, "kv_cache_blocks", "gauge",
         "KV cache blocks by state: used by live sequences, cached (prefix cache, reusable), "
         "free.");
    line(&m, "inferd:kv_cache_blocks{%s,state=\"used\"} %" PRId64 "\n", m.label,
         st.kv_blocks_used);
    line(&m, "inferd:kv_cache_blocks{%s,state=\"cached\"} %" PRId64 "\n", m.label,
         st.kv_blocks_cached);
    line(&m, "inferd:kv_cache_blocks{%s,state=\"free\"} %" PRId64 "\n", m.label,
         st.kv_blocks_free);
    gauge(&m, "num_requests_in_flight", "Generation requests the API is answering.", a->n_live);
    counter(&m, "prompt_tokens_total", "Prompt tokens computed (prefix cache hits excluded).",
            (uint64_t)st.prompt_tokens_computed);
    counter(&m, "generation_tokens_total", "Tokens generated.", (uint64_t)st.generation_tokens);
    counter(&m, "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
            (uint64_t)st.prefix_query_tokens);
    counter(&m, "prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
            (uint64_t)st.prefix_hit_tokens);
    counter(&m, "num_preemptions_total", "Sequences preempted for KV cache space.",
            (uint64_t)st.preemptions);
    counter(&m, "engine_steps_total", "Model steps run.", (uint64_t)st.steps);
    counter(&m, "engine_steps_ahead_total",
            "Decode steps launched before the previous step's tokens reached the host.",
            (uint64_t)st.steps_ahead);
    counter(&m, "requests_rejected_total", "Requests refused because the queue was full.",
            (uint64_t)st.requests_rejected);
    head(&m, "request_success_total", "counter", "Choices finished, by finish reason.");
    static const char *const reasons[] = {"stop", "length", "abort", "error"};
    for (int i = 0; i < 4; i++)
        line(&m, "inferd:request_success_total{%s,finished_reason=\"%s\"} %" PRIu64 "\n",
             m.label, reasons[i], a->finished_by_reason[i]);
    hist(&m, "time_to_first_token_seconds", "Time to first token.", &st.ttft);
    hist(&m, "inter_token_latency_seconds", "Time between two tokens of a sequence.", &st.itl);
    hist(&m, "e2e_request_latency_seconds", "Time from submit to the last token.", &st.e2e);
    hist(&m, "request_queue_time_seconds", "Time waiting before the first admission.",
         &st.queue_time);
    hist(&m, "iteration_tokens_total", "Token rows per model step.", &st.tokens_per_step);
    hist(&m, "step_time_seconds", "Duration of one model step.", &st.step_time);

    head(&m, "http_requests_total", "counter", "HTTP responses sent, by status code.");
    for (int s = 100; s < 600; s++)
        if (a->http_by_status[s])
            line(&m, "inferd:http_requests_total{%s,status=\"%d\"} %" PRIu64 "\n", m.label, s,
                 a->http_by_status[s]);
    counter(&m, "stream_cancelled_slow_reader_total",
            "Streams cancelled because the client stopped reading.", a->n_stream_cancelled_slow);
    if (a->http) {
        struct http_stats hs;
        http_server_get_stats(a->http, &hs);
        gauge(&m, "http_connections_open", "Open client connections.", hs.connections_open);
        counter(&m, "http_connections_total", "Client connections accepted.",
                hs.connections_accepted);
        counter(&m, "http_connections_refused_total", "Connections refused over the limit.",
                hs.connections_refused);
        counter(&m, "http_rejected_malformed_total", "Requests refused as malformed (400).",
                hs.rejected_malformed);
        counter(&m, "http_rejected_too_large_total", "Requests refused as too large.",
                hs.rejected_too_large);
        counter(&m, "http_timeouts_total", "Connections timed out.", hs.timeouts);
        counter(&m, "http_requests_aborted_total", "Requests whose client went away.",
                hs.requests_aborted);
        counter(&m, "http_bytes_received_total", "Bytes read from clients.", hs.bytes_in);
        counter(&m, "http_bytes_sent_total", "Bytes written to clients.", hs.bytes_out);
    }
}
