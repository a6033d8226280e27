"""nnpre.registry.Registry: the rules shared by the pretext, adapter and fine-tuning-task registries."""
import pytest

from nnpre.errors import NnPreError
from nnpre.registry import Registry


class Base:
    pass


def test_add_get_names_and_one_line_unknown_name_error():
    reg = Registry("widget", choices="known widgets:")
    assert reg.add("b", "pkg.mod:B") == "pkg.mod:B"
    reg.add("a", "pkg.mod:A")
    reg.add("a", "pkg.mod:A")  # the same entry again (a module imported twice) is fine
    assert reg.names() == ["a", "b"] and len(reg) == 2 and "a" in reg and "c" not in reg
    assert reg.get("b") == "pkg.mod:B"
    with pytest.raises(NnPreError) as e:
        reg.get("c")
    assert str(e.value) == "unknown widget 'c'; known widgets: a, b"
    with pytest.raises(ValueError, match=r"widget 'a' is already registered \(pkg.mod:A\)"):
        reg.add("a", "pkg.mod:Other")
    assert reg.get("a") == "pkg.mod:A"  # the refused entry did not replace the first one


def test_default_choices_wording_and_empty_registry():
    reg = Registry("adapter")
    with pytest.raises(NnPreError, match=r"^unknown adapter 'lora'; choose one of $"):
        reg.get("lora")


def test_class_decorator_sets_name_checks_base_and_duplicates():
    reg = Registry("thing")

    @reg.register("one", base=Base)
    class One(Base):
        pass

    assert One.name == "one" and reg.get("one") is One
    assert reg.register("one", base=Base)(One) is One  # re-registering the same class is a no-op
    with pytest.raises(ValueError, match=r"thing 'one' is already registered \(One\)"):
        reg.register("one")(type("Two", (Base,), {}))
    with pytest.raises(TypeError, match="needs a Base subclass"):
        reg.register("x", base=Base)(object)
    with pytest.raises(TypeError, match="needs a Base subclass"):
        reg.register("y", base=Base)(lambda: None)
    assert reg.names() == ["one"]  # refused classes were not registered
    assert reg.pop("one") is One and reg.pop("one") is None and reg.names() == []


def test_registries_are_independent():
    a, b = Registry("a"), Registry("b")
    a.add("x", 1)
    assert "x" not in b and b.names() == []
