"""Property tests: whatever text arrives, the parser returns policies and PolicyErrors, never raises."""

from __future__ import annotations

import copy
import io
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from enforcer.errors import PolicyError, PolicyErrors
from enforcer.policy import Policy, parse_policy, parse_text, policy_files
from tests.conftest import EXAMPLES

# FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _examples() -> list[dict[str, Any]]:
    if not EXAMPLES.is_dir():
        return []
    docs = []
    for f in policy_files([EXAMPLES])[0]:
        for d in YAML(typ="safe").load_all(f.read_text()):
            if isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("security.kubearmor.com"):
                docs.append(d)
    return docs


EXAMPLE_DOCS = _examples()
needs_examples = pytest.mark.skipif(not EXAMPLE_DOCS, reason=f"KubeArmor examples not found at {EXAMPLES}")


def check(text: str) -> None:
    policies, errors = parse_text(text, "fuzz.yaml")
    assert all(isinstance(p, Policy) for p in policies)
    for e in errors:
        assert isinstance(e, PolicyError)
        assert e.file == "fuzz.yaml"
        assert e.reason
        assert e.line is None or e.line >= 1
        str(e)


@FUZZ
@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    check(text)


# Text made of YAML's own punctuation reaches the parser's error paths far more often.
YAMLISH = st.lists(
    st.sampled_from(
        [
            "\n",
            "  ",
            "- ",
            ": ",
            "? ",
            "[",
            "]",
            "{",
            "}",
            ",",
            "&a ",
            "*a ",
            "!!str ",
            "!!binary ",
            "|",
            ">",
            "'",
            '"',
            "#",
            "---\n",
            "...\n",
            "<<: ",
            "%YAML 1.1\n",
            "kind",
            "spec",
            "apiVersion",
            "1",
            "~",
            "yes",
        ]
    ),
    max_size=60,
).map("".join)


@FUZZ
@given(YAMLISH)
def test_yaml_punctuation(text: str) -> None:
    check(text)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["/etc/", "/bin/sh", "Block", "tcp", "net_raw", "[a,b]", "KubeArmorPolicy"]),
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4))


values = st.recursive(scalars, _containers, max_leaves=12)


def dump(doc: Any) -> str:
    out = io.StringIO()
    YAML(typ="safe", pure=True).dump(doc, out)
    return out.getvalue()


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated_examples(draw: st.DrawFn) -> dict[str, Any]:
    doc = copy.deepcopy(draw(st.sampled_from(EXAMPLE_DOCS)))
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(paths(doc)[1:]))
        parent = doc
        for key in target[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            parent[target[-1]] = draw(values)
        elif isinstance(parent, dict):
            del parent[target[-1]]
        else:
            parent.pop(target[-1])
    return doc


@needs_examples
@FUZZ
@given(mutated_examples())
def test_mutated_examples(doc: dict[str, Any]) -> None:
    check(dump(doc))
    try:
        policy = parse_policy(doc, file="api")
    except PolicyErrors as e:
        assert e.errors and all(isinstance(x, PolicyError) for x in e.errors)
    else:
        assert policy.name == doc["metadata"]["name"]


@FUZZ
@given(values)
def test_random_documents(doc: Any) -> None:
    check(dump(doc))
