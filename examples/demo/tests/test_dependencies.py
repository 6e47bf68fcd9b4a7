"""A third-party dependency (and pytest plugin) in the sandbox, with no Dockerfile for it.

hypothesis is installed in the environment pytest runs in; `pytest --sandbox`
mirrors that environment into the sandbox, so the routed tests import the same
version and its pytest plugin is active there too.
"""

import hypothesis
import pytest
from demo import slugify
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.sandbox(memory="256m", timeout=60)


@given(st.text())
def test_slugify_output_is_always_a_slug(text):
    slug = slugify(text)
    assert slug == slug.lower()
    assert "--" not in slug and not slug.startswith("-") and not slug.endswith("-")


def test_the_dependency_comes_from_the_mirrored_environment():
    print(f"hypothesis {hypothesis.__version__} from {hypothesis.__file__}")
    assert hypothesis.__file__.startswith("/opt/pytest-sandbox/site/")
