"""Chat templates: engine/chat_template.c against Python jinja2 set up as
Hugging Face's apply_chat_template sets it up, byte for byte, on the chat
templates of real model families and on conversations that stress them
(Unicode, braces, whitespace, tool calls, rejected role orders); then
hostile templates, which must fail fast with a clear error."""
import datetime
import json
import pathlib
import subprocess
import tempfile
import time

import jinja2
import jinja2.ext
import jinja2.sandbox
import pytest

from conftest import ASAN_BUILD, BUILD, ROOT

TEMPLATES = ROOT / "tests" / "fixtures" / "chat_templates"
CONVERSATIONS = json.loads((TEMPLATES / "conversations.json").read_text())


def runner(build=BUILD):
    exe = build / "tests" / "unit" / "chat_template_runner"
    if not exe.exists():
        pytest.fail(f"{exe} not built: run ninja -C {build.name}")
    return exe


def runner_builds():
    out = [BUILD]
    if (ASAN_BUILD / "tests" / "unit" / "chat_template_runner").exists():
        out.append(ASAN_BUILD)
    return out


class AssistantTracker(jinja2.ext.Extension):
    """HF's {% generation %} block, minus the span tracking it adds for
    training masks: the rendered text is the same."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [],
                                      body).set_lineno(lineno)

    def _generation_support(self, caller):
        return caller()


def hf_env():
    """The environment transformers' _compile_jinja_template builds."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


ENV = hf_env()


def render_py(src, ctx):
    """(output, None) or (None, (raised message or None, exception))."""
    kwargs = dict(ctx.get("extra", {}))
    kwargs.update(messages=ctx["messages"], tools=ctx.get("tools"),
                  add_generation_prompt=ctx.get("add_generation_prompt", False),
                  bos_token=ctx.get("bos_token", ""), eos_token=ctx.get("eos_token", ""))
    try:
        return ENV.from_string(src).render(**kwargs), None
    except jinja2.exceptions.TemplateError as e:
        raised = str(e) if type(e) is jinja2.exceptions.TemplateError else None
        return None, (raised, e)
    except Exception as e:  # TypeError and friends: the template is broken for this input
        return None, (None, e)


def render_c(src, ctx, build=BUILD, timeout=30):
    """(returncode, stdout bytes, stderr text, seconds)."""
    with tempfile.TemporaryDirectory() as d:
        tpath = pathlib.Path(d) / "t.jinja"
        cpath = pathlib.Path(d) / "ctx.json"
        tpath.write_bytes(src.encode() if isinstance(src, str) else src)
        cpath.write_text(json.dumps(ctx))
        t0 = time.monotonic()
        r = subprocess.run([str(runner(build)), str(tpath), str(cpath)], capture_output=True,
                           timeout=timeout)
        return r.returncode, r.stdout, r.stderr.decode(errors="replace"), time.monotonic() - t0


def check_parity(src, ctx):
    want, perr = render_py(src, ctx)
    rc, out, err, _ = render_c(src, ctx)
    if perr is None:
        assert rc == 0, f"jinja2 rendered {want!r} but ours failed: {err}"
        assert out.decode() == want
    else:
        raised, exc = perr
        assert rc == 1, f"jinja2 failed with {exc!r} but ours rendered {out!r}"
        if raised is not None:
            assert err.strip() == f"raised: {raised}"
        else:
            assert not err.startswith("raised:"), err


# ------------------------------------------------------------ model templates

TEMPLATE_FILES = sorted(p.name for p in TEMPLATES.glob("*.jinja"))


@pytest.mark.parametrize("gen", [False, True], ids=["nogen", "gen"])
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", TEMPLATE_FILES)
def test_model_template_parity(template, conv, gen):
    src = (TEMPLATES / template).read_text()
    ctx = dict(CONVERSATIONS[conv], add_generation_prompt=gen, bos_token="<s>",
               eos_token="</s>")
    check_parity(src, ctx)


def test_fixture_set_is_complete():
    names = set(TEMPLATE_FILES)
    for family in ["llama3.jinja", "llama3.1.jinja", "mistral-v0.3.jinja", "qwen2.5.jinja",
                   "phi3.jinja", "gemma2.jinja", "gemma3.jinja", "chatml.jinja"]:
        assert family in names


def test_llama31_extra_variables():
    src = (TEMPLATES / "llama3.1.jinja").read_text()
    ctx = dict(CONVERSATIONS["tool_calls"], add_generation_prompt=True, bos_token="<s>",
               extra={"date_string": "01 Jan 2025", "tools_in_user_message": False,
                      "builtin_tools": ["brave_search", "code_interpreter"]})
    check_parity(src, ctx)


# ------------------------------------------------------------ language features

MSGS = [{"role": "system", "content": "sys"}, {"role": "user", "content": "héllo wörld 🙂"},
        {"role": "assistant", "content": "  answer  "}]

SNIPPETS = [
    # whitespace control and trim/lstrip blocks
    "a\n  {% if true %}\n  b\n  {% endif %}\nc",
    "a  {%- if true -%}  b  {%- endif -%}  c",
    "x {{- ' y ' -}} z\n{{ 1 }}  \n  {{ 2 }}",
    "  {# comment #}\nA\n{#- c2 -#}  B",
    "{% for m in messages %}\n    {{ m.role }}\n{% endfor %}\n",
    "{%+ if true %}x{% endif +%}\ny",
    "{% raw %}{{ not evaluated }}{% endraw %}",
    "line1\r\nline2\rline3\n",
    # literals and operators
    "{{ 1 + 2 * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 7 / 2 }}",
    "{{ 1.5 + 1 }} {{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1.0 }} {{ 3 / 3 }} {{ 1e-5 }} {{ 123456789.125 }}",
    "{{ 'a' ~ 1 ~ none ~ true }} {{ 'ab' * 3 }} {{ [1] + [2, 3] }} {{ 'x' + 'y' }}",
    "{{ \"q\\\"uote\\n\\t\\u00e9\\x41\" }} {{ 'it''s' }} {{ 'a' 'b' }}",
    "{{ [1, 'a', none, true, 1.5, {'k': [2]}] }} {{ {'a': 1, 'b': 'c'} }} {{ (1, 2) | list }}",
    "{{ none }} {{ true }} {{ False }} {{ undefined_var }} [{{ messages[99] }}]",
    "{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'a' < 'b' }} {{ 1 == 1.0 }} {{ [1,2] == [1,2] }} {{ 1 != 2 }}",
    "{{ 'ell' in 'hello' }} {{ 2 in [1,2] }} {{ 'role' in messages[0] }} {{ 3 not in [1] }}",
    "{{ not true }} {{ true and 'x' }} {{ false or 'y' }} {{ none or 0 }} {{ 'a' if false }}",
    "{{ 'yes' if messages else 'no' }} {{ 1 if 0 else 2 if 0 else 3 }}",
    # access and slicing
    "{{ messages[0].role }} {{ messages[0]['content'] }} {{ messages[-1].content }} {{ messages.0.role }}",
    "{{ messages[1:] | length }} {{ messages[::-1][0].role }} {{ messages[:-1] | map(attribute='role') | join(',') }}",
    "{{ 'héllo🙂'[1] }} {{ 'héllo🙂'[-1] }} {{ 'héllo🙂'[1:4] }} {{ 'abcdef'[::2] }} {{ 'abc'[::-1] }}",
    "{{ [1,2,3,4,5][1:4:2] }} {{ [1,2,3][5:] }} {{ [1,2,3][-2:] }} {{ [1,2,3][:-5] }}",
    # tests
    "{{ x is defined }} {{ messages is defined }} {{ none is none }} {{ 'a' is string }} {{ 1 is number }}",
    "{{ {} is mapping }} {{ [] is iterable }} {{ 'a' is iterable }} {{ 3 is odd }} {{ 4 is even }}",
    "{{ 6 is divisibleby 3 }} {{ 6 is divisibleby(4) }} {{ 1 is integer }} {{ 1.0 is float }} {{ true is boolean }}",
    "{{ x is not defined }} {{ 'a' is not none }} {{ 1 is eq 1 }} {{ 'A' is upper }} {{ 'ab' is lower }}",
    # filters
    "{{ '  hi  ' | trim }}|{{ 'xxhixx' | trim('x') }}|{{ 'hi' | upper }}|{{ 'HI' | lower }}|{{ 'hello wORLD' | capitalize }}",
    "{{ 'hello big-world (x)' | title }} {{ 'aaa' | replace('a', 'b') }} {{ 'aaa' | replace('a', 'b', 2) }}",
    "{{ x | default('d') }} {{ '' | default('e', true) }} {{ 0 | default(5) }} {{ none | d('n') }}",
    "{{ [1,2,3] | join('-') }} {{ [1,2,3] | first }} {{ [1,2,3] | last }} {{ 'abc' | list }} {{ 'abc' | first }}",
    "{{ messages | length }} {{ 'héllo' | length }} {{ {'a':1} | length }} {{ 12 | string }} {{ '42' | int + 1 }}",
    "{{ '3.7' | int }} {{ 'x' | int }} {{ 3.9 | int }} {{ '2.5' | float }} {{ 4 | float }} {{ -3 | abs }}",
    "{% for k, v in {'b': 1, 'a': 2} | items %}{{ k }}={{ v }};{% endfor %}",
    "{{ messages | selectattr('role', 'equalto', 'user') | list | length }} {{ messages | rejectattr('role', 'eq', 'user') | map(attribute='role') | list }}",
    "{{ [1, 0, 2, none] | select | list }} {{ [1,2,3,4] | select('odd') | list }} {{ [1,2,3,4] | reject('odd') | list }}",
    "{{ ['a', 'b'] | map('upper') | list }} {{ [3,1] | reverse | list }} {{ 'abc' | reverse }}",
    "{{ messages[0] | tojson }} {{ 'é\"\\n\\u0001' | tojson }} {{ [1, 2.5, none, true] | tojson }}",
    "{{ {'a': {'b': [1, {}], 'c': []}} | tojson(indent=2) }} {{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}",
    "{{ 'line1\nline2\n\nline4' | indent(2) }}|{{ 'a\nb' | indent(4, true) }}",
    "{{ '<a href=\"x\">&\\'' | e }}",
    # string and dict methods
    "{{ '  x  '.strip() }}|{{ '  x  '.lstrip() }}|{{ '  x  '.rstrip() }}|{{ 'xxhixx'.strip('x') }}",
    "{{ 'abc'.startswith('ab') }} {{ 'abc'.endswith('bc') }} {{ 'abc'.startswith(('x', 'a')) }}",
    "{{ 'a b  c'.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a,b,c'.split(',', 1) }} {{ 'AbC'.upper() }}{{ 'AbC'.lower() }}",
    "{{ 'hello world'.title() }} {{ 'aXa'.replace('a', 'b') }} {{ 'hello'.capitalize() }} {{ 'abcb'.find('b') }} {{ 'abcb'.count('b') }}",
    "{{ ', '.join(['a', 'b']) }} {{ {'a': 1}.get('a') }} {{ {'a': 1}.get('b', 'dflt') }} {{ {'a': 1}.get('b') }}",
    "{% for k, v in messages[0].items() %}{{ k }}:{{ v }} {% endfor %}{{ messages[0].keys() | list }}",
    # statements
    "{% for m in messages %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.length }}/{{ loop.first }}/{{ loop.last }}/{{ loop.revindex }} {% endfor %}",
    "{% for m in messages %}{{ loop.previtem.role if loop.previtem is defined else '-' }}>{{ loop.nextitem.role if loop.nextitem is defined else '-' }} {% endfor %}",
    "{% for m in messages if m.role != 'system' %}{{ m.role }}{{ loop.length }} {% endfor %}",
    "{% for x in [] %}x{% else %}empty{% endfor %} {% for x in none_var %}y{% else %}undef-empty{% endfor %}",
    "{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}",
    "{% for i in range(1, 10, 3) %}{{ i }}{% endfor %} {% for i in range(3, 0, -1) %}{{ i }}{% endfor %}",
    "{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }} {% endfor %}{% for x in 'ab' %}{{ x }}{% endfor %}",
    "{% for i in range(2) %}{% for j in range(2) %}{{ loop.index }}{{ i }}{{ j }} {% endfor %}{{ loop.index }}|{% endfor %}",
    "{% if false %}a{% elif none %}b{% elif 1 %}c{% else %}d{% endif %}",
    "{% set x = 1 %}{% for i in range(3) %}{% set x = x + i %}{{ x }}{% endfor %}|{{ x }}",
    "{% set ns = namespace(total=0, names=[]) %}{% for m in messages %}{% set ns.total = ns.total + 1 %}{% set ns.names = ns.names + [m.role] %}{% endfor %}{{ ns.total }} {{ ns.names }}",
    "{% set a, b = 1, 2 %}{{ a }}{{ b }} {% set t %}captured {{ a }}{% endset %}[{{ t }}]",
    "{% if true %}{% set leak = 'if-scoped' %}{% endif %}{{ leak }}",
    "{% for i in range(2) %}{% if loop.first %}{% set f = 'first' %}{% endif %}{{ f }};{% endfor %}",
    "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('a') }} {{ greet('b', punct='?') }} {{ greet(name='c') }}",
    "{% macro render(m) %}<{{ m.role }}>{% if m.content is string %}{{ m.content | trim }}{% endif %}{% endmacro %}{% for m in messages %}{{ render(m) }}{% endfor %}",
    "{{ bos_token }}{{ eos_token }}{{ add_generation_prompt }}{{ tools }}",
    "{% generation %}gen text{% endgeneration %}",
    "{{ raise_exception('custom failure: ' ~ messages | length) }}",
    "{{ dict(a=1, b='x') }} {{ namespace(a=1).a }}",
    # undefined variables print nothing (a fuzzer found this handing
    # memcpy a NULL source; the sanitizer build runs it below too)
    "{{ content }}",
    "{% for m in messages %}[{{ content }}]{% endfor %}",
]


@pytest.mark.parametrize("idx", range(len(SNIPPETS)))
def test_feature_parity(idx):
    ctx = {"messages": MSGS, "add_generation_prompt": True, "bos_token": "<s>",
           "eos_token": "</s>"}
    check_parity(SNIPPETS[idx], ctx)


def test_strftime_now():
    rc, out, err, _ = render_c("{{ strftime_now('%Y-%m-%d') }}", {"messages": []})
    assert rc == 0, err
    today = datetime.date.today()
    assert out.decode() in {today.isoformat(),
                            (today - datetime.timedelta(days=1)).isoformat(),
                            (today + datetime.timedelta(days=1)).isoformat()}


# ------------------------------------------------------------ hostile templates

HOSTILE = [
    ("{% for i in range(10**9) %}x{% endfor %}", "limit", "output"),
    ("{% for i in range(10**9) %}{% endfor %}", "limit", "steps"),
    ("{{ range(10**9) | list | length }}", "limit", ""),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "limit", "steps"),
    ("{{ 'x' * 10**9 }}", "limit", "memory"),
    ("{% for i in range(1000) %}{% for j in range(1000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}", "limit", "output"),
    ("{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", "limit", ""),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "limit", "nested"),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "limit", "nesting"),
    ("{{ " + "[" * 5000 + "]" * 5000 + " }}", "limit", "nesting"),
    ("{% if true %}" * 3000 + "{% endif %}" * 3000, "limit", "nesting"),
    ("{{ " + "not " * 5000 + "true }}", "limit", "nesting"),
    ("{{ " + "-" * 5000 + "1 }}", "limit", "nesting"),
    ("{{ messages.__class__ }}", "runtime", "__class__"),
    ("{{ messages[0].__class__.__mro__ }}", "runtime", "__class__"),
    ("{{ ''.__class__ }}", "runtime", "__class__"),
    ("{{ messages.append(1) }}", "runtime", "immutable"),
    ("{{ 2 ** 100 }}", "runtime", "overflow"),
    ("{{ 1 // 0 }}", "runtime", "division"),
    ("{{ x.y }}", "runtime", "'x' is undefined"),
    ("{{ messages | nosuchfilter }}", "runtime", "no filter named 'nosuchfilter'"),
    ("{{ unterminated", "syntax", "line 1"),
    ("hello\n{% if x %}\nno end", "syntax", "line 2: unclosed 'if'"),
    ("{% for x in y %}{% endif %}", "syntax", "endif"),
    ("{{ 'unterminated }}", "syntax", "unterminated string"),
    ("{# never closed", "syntax", "comment"),
    ("{% endfor %}", "syntax", "no open block"),
    ("{{ 1 + }}", "syntax", "expected an expression"),
    ("a\nb\n{% frobnicate %}", "syntax", "line 3"),
    ("{{ a b }}", "syntax", "expected"),
]


@pytest.mark.parametrize("build", runner_builds(), ids=lambda b: b.name)
@pytest.mark.parametrize("idx", range(len(HOSTILE)))
def test_hostile_template(idx, build):
    src, kind, needle = HOSTILE[idx]
    rc, out, err, secs = render_c(src, {"messages": MSGS}, build=build)
    assert rc == 1, f"expected failure, got rc={rc} out={out[:200]!r} err={err}"
    assert err.startswith(kind + ":"), err
    assert needle in err, err
    assert "line" in err, err
    # The budget is 10M steps; even the sanitizer build ends well under a second
    # of template work (the process start is included here).
    assert secs < (1.0 if build == BUILD else 3.0), f"took {secs:.2f}s"
