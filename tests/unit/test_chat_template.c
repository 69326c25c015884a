/* test_chat_template.c: the chat-template interpreter through
 * engine/chat_template.h.
 *
 * Renders small templates over string and JSON messages, checks the error
 * codes and messages (syntax with line numbers, raise_exception, undefined,
 * sandbox refusals, limits), that every prefix of a real template fails or
 * renders cleanly, and that a compiled template renders repeatedly.
 * Byte-for-byte parity with Python jinja2 lives in tests/test_chat_template.py.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/chat_template.h"
#include "engine/json.h"

static int n_checks, n_failed;

#define CHECK(cond)                                                        \
    do {                                                                   \
        n_checks++;                                                        \
        if (!(cond)) {                                                     \
            n_failed++;                                                    \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,         \
                    __LINE__, #cond);                                      \
        }                                                                  \
    } while (0)

static const struct chat_message convo[] = {
    {"system", "Be brief."},
    {"user", "  Hi {{ there }} 🙂 "},
    {"assistant", "Hello."},
};

/* Renders src over convo; returns the rc, and the output or error in buf. */
static int render_opts(const char *src, const struct chat_render_opts *opts, char *buf,
                       size_t n)
{
    struct chat_template *t = NULL;
    int rc = chat_template_compile(src, strlen(src), &t, buf, n);
    if (rc != 0) {
        CHECK(t == NULL);
        return rc;
    }
    char *out = NULL;
    size_t len = 0;
    rc = chat_template_render(t, convo, 3, opts, &out, &len, buf, n);
    if (rc == 0) {
        CHECK(out && strlen(out) == len);
        snprintf(buf, n, "%s", out);
    } else {
        CHECK(out == NULL);
    }
    free(out);
    chat_template_destroy(t);
    return rc;
}

static void expect_n(int line, const char *src, int want_rc, const char *want)
{
    char buf[4096];
    struct chat_render_opts opts = {.add_generation_prompt = 1, .bos_token = "<s>",
                                    .eos_token = "</s>"};
    int rc = render_opts(src, &opts, buf, sizeof(buf));
    n_checks++;
    int ok = rc == want_rc && (want_rc == 0 ? strcmp(buf, want) == 0 : strstr(buf, want) != NULL);
    if (!ok) {
        n_failed++;
        fprintf(stderr, "%s:%d: %s\n  want rc %d \"%s\"\n  got  rc %d \"%s\"\n", __FILE__, line,
                src, want_rc, want, rc, buf);
    }
}
#define EXPECT(src, want) expect_n(__LINE__, src, 0, want)
#define EXPECT_ERR(src, rc, want) expect_n(__LINE__, src, rc, want)

static void test_render(void)
{
    EXPECT("{% for m in messages %}<{{ m.role }}>{{ m['content'] | trim }}\n{% endfor %}",
           "<system>Be brief.\n<user>Hi {{ there }} 🙂\n<assistant>Hello.\n");
    EXPECT("{{ bos_token }}{% if add_generation_prompt %}gen{% endif %}{{ eos_token }}",
           "<s>gen</s>");
    EXPECT("{{ tools }} {{ tools is none }}", "None True");
    EXPECT("a\n  {% if true %}\n  b\n  {% endif %}\nc\n", "a\n  b\nc");
    EXPECT("{{ messages[1].content[2:4] }}|{{ messages[1:] | length }}", "Hi|2");
    EXPECT("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
           "{% endfor %}{{ ns.n }}",
           "3");
    EXPECT("{{ {'a': [1, 2.5, none, 'é']} | tojson }}", "{\"a\": [1, 2.5, null, \"é\"]}");
    EXPECT("{{ 'x,y'.split(',') | join('+') }} {{ '%d' | length }}", "x+y 2");
    EXPECT("{% macro m(a, b=2) %}{{ a * b }}{% endmacro %}{{ m(3) }},{{ m(3, b=4) }}", "6,12");
}

static void test_json_messages(void)
{
    const char *doc = "[{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": "
                      "\"hi\"}]}, {\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"function\": "
                      "{\"name\": \"f\", \"arguments\": {\"x\": 1}}}]}]";
    char err[512];
    struct json *msgs = json_parse(doc, strlen(doc), err, sizeof(err));
    const char *xdoc = "{\"date_string\": \"today\"}";
    struct json *extra = json_parse(xdoc, strlen(xdoc), err, sizeof(err));
    CHECK(msgs && extra);
    const char *src = "{% for m in messages %}{% if m.content is string %}{{ m.content }}"
                      "{% elif m.content is iterable %}{{ m.content[0].text }}{% endif %}"
                      "{% for c in m.tool_calls %}{{ c.function.name }}"
                      "{{ c.function.arguments | tojson }}{% endfor %};{% endfor %}{{ date_string }}";
    struct chat_template *t = NULL;
    CHECK(chat_template_compile(src, strlen(src), &t, err, sizeof(err)) == 0);
    struct chat_render_opts opts = {.extra = extra};
    for (int rep = 0; rep < 3; rep++) { /* a compiled template renders again and again */
        char *out = NULL;
        size_t len;
        CHECK(chat_template_render_json(t, msgs, &opts, &out, &len, err, sizeof(err)) == 0);
        CHECK(out && strcmp(out, "hi;f{\"x\": 1};today") == 0);
        free(out);
    }
    chat_template_destroy(t);
    json_free(msgs);
    json_free(extra);
}

static void test_errors(void)
{
    EXPECT_ERR("{{ raise_exception('no system role') }}", CHAT_TEMPLATE_ERAISED, "no system role");
    EXPECT_ERR("a\nb\n{% if x %}", CHAT_TEMPLATE_ESYNTAX, "line 3: unclosed 'if'");
    EXPECT_ERR("{{ 1 +* 2 }}", CHAT_TEMPLATE_ESYNTAX, "line 1:");
    EXPECT_ERR("{{ 'abc }}", CHAT_TEMPLATE_ESYNTAX, "unterminated string");
    EXPECT_ERR("{% endif %}", CHAT_TEMPLATE_ESYNTAX, "no open block");
    EXPECT_ERR("\n{{ x.y }}", CHAT_TEMPLATE_ERUNTIME, "line 2: 'x' is undefined");
    EXPECT_ERR("{{ messages.__class__ }}", CHAT_TEMPLATE_ERUNTIME, "'__class__' is not allowed");
    EXPECT_ERR("{{ messages.append(1) }}", CHAT_TEMPLATE_ERUNTIME, "immutable");
    EXPECT_ERR("{{ 'a' + 1 }}", CHAT_TEMPLATE_ERUNTIME, "unsupported operand");
    EXPECT_ERR("{{ x | nope }}", CHAT_TEMPLATE_ERUNTIME, "no filter named 'nope'");
    EXPECT_ERR("{% for i in range(1000000000) %}{% endfor %}", CHAT_TEMPLATE_ELIMIT, "steps");
    EXPECT_ERR("{{ 'x' * 1000000000 }}", CHAT_TEMPLATE_ELIMIT, "memory");
    EXPECT_ERR("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", CHAT_TEMPLATE_ELIMIT, "nested");

    char deep[8192];
    size_t k = 0;
    k += (size_t)snprintf(deep, sizeof(deep), "{{ ");
    for (int i = 0; i < 2000; i++)
        deep[k++] = '(';
    deep[k++] = '1';
    for (int i = 0; i < 2000; i++)
        deep[k++] = ')';
    snprintf(deep + k, sizeof(deep) - k, " }}");
    EXPECT_ERR(deep, CHAT_TEMPLATE_ELIMIT, "nesting");

    /* limits are the caller's to choose */
    char buf[256];
    struct chat_render_opts small = {.max_output = 10};
    CHECK(render_opts("{% for m in messages %}{{ m.content }}{% endfor %}", &small, buf,
                      sizeof(buf)) == CHAT_TEMPLATE_ELIMIT);
    CHECK(strstr(buf, "output exceeds 10 bytes") != NULL);
    struct chat_render_opts few = {.max_steps = 50};
    CHECK(render_opts("{% for i in range(100) %}{% endfor %}", &few, buf, sizeof(buf)) ==
          CHAT_TEMPLATE_ELIMIT);
}

/* Every prefix of a real template either compiles and renders or fails
 * with a message: never a crash (the ASan build makes that checkable). */
static void test_prefixes(void)
{
    const char *src =
        "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
        "{%- endif %}{% for m in messages[1:] if m.role != 'tool' %}\n"
        "  {{- '<|' ~ m.role ~ '|>\\n' + m.content | trim }}{# c #}{% if not loop.last %}"
        "\n{% endif %}{% endfor %}{{ {'k': [1, 2]} | tojson(indent=2) }}";
    size_t n = strlen(src);
    for (size_t i = 0; i <= n; i++) {
        struct chat_template *t = NULL;
        char err[256];
        err[0] = '\0';
        int rc = chat_template_compile(src, i, &t, err, sizeof(err));
        if (rc != 0) {
            CHECK(t == NULL && strncmp(err, "line ", 5) == 0);
            continue;
        }
        char *out = NULL;
        rc = chat_template_render(t, convo, 3, NULL, &out, NULL, err, sizeof(err));
        CHECK(rc == 0 ? out != NULL : (out == NULL && err[0] != '\0'));
        free(out);
        chat_template_destroy(t);
    }
    chat_template_destroy(NULL);
}

int main(void)
{
    test_render();
    test_json_messages();
    test_errors();
    test_prefixes();
    printf("%d checks, %d failed\n", n_checks, n_failed);
    return n_failed ? 1 : 0;
}
