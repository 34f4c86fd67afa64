"""The user documentation names only code that exists.

Every backticked name in README.md and docs/*.md that looks like code is checked against the
repository's code: a dotted path into our packages (`models.projection.project`) must resolve to
a module file that defines the rest; any other name (a class, a function, a key, a flag value)
must occur in the code as a word. Names of other projects the docs compare with are listed.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
CODE_DIRS = ("src", "bench", "scripts", "tests")
PACKAGES = ("models", "util", "tasks")
# names from other libraries or the shell that documentation may name without our code using the word
EXTERNAL = {"pytest", "torchrun", "nproc_per_node", "num_processes", "multi_gpu", "pyplot", "sacreBLEU",
            "rouge_score", "EARLY_EXIT_DEBUG", "accelerate", "peft", "make",
            "BetaMixture1D", "predict_proba", "fit",  # FREE's code, which the docs compare with
            "train_runtime", "train_samples_per_second"}  # keys of HF's Trainer
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\(.*\))?$")


def code_text() -> str:
    parts = []
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh") and path.is_file() and path.name != "test_docs.py":
                parts.append(path.read_text(encoding="utf-8"))
    parts.append((ROOT / "Makefile").read_text(encoding="utf-8"))
    return "\n".join(parts)


def defines(text: str, name: str) -> bool:
    return re.search(rf"(^|\n)\s*(def|class)\s+{name}\b|(^|\n)\s*{name}\s*[:=]|self\.{name}\s*=|\bdef {name}\b"
                     rf"|@property\s*\n\s*def {name}\b", text) is not None


def module_file(parts):
    """(path of the longest module prefix of `parts` in our packages, the remaining parts)."""
    for cut in range(len(parts), 0, -1):
        path = ROOT / "src" / Path(*parts[:cut])
        if path.with_suffix(".py").is_file():
            return path.with_suffix(".py"), parts[cut:]
        if (path / "__init__.py").is_file() or path.is_dir():
            if cut == len(parts):
                return path, []
    return None, parts


def doc_names():
    names = set()
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)  # names in prose and tables
        for token in re.findall(r"`([^`\n]+)`", text):
            token = token.strip()
            if IDENTIFIER.match(token) and not token.startswith("--"):
                names.add((token, doc.name))
    return sorted(names)


CODE = code_text()


def problem(token: str):
    name = token.split("(")[0]
    parts = name.split(".")
    if parts[0] in EXTERNAL or name in EXTERNAL:
        return None
    if parts[0] in PACKAGES and len(parts) > 1:
        path, rest = module_file(parts)
        if path is None:
            return f"no module for {name}"
        if rest:
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
            if not defines(text, rest[0]):
                return f"{path.relative_to(ROOT)} defines no {rest[0]}"
        return None
    last = parts[-1]
    if not re.search(rf"(?<![A-Za-z0-9_]){re.escape(last)}(?![A-Za-z0-9_])", CODE):
        return f"{last} does not occur in the code"
    return None


@pytest.mark.parametrize("token, doc", doc_names())
def test_documented_name_exists(token, doc):
    assert problem(token) is None, f"{doc}: `{token}`: {problem(token)}"


def test_the_check_catches_names_that_do_not_exist():
    for token in ("next_token_after", "truncated_lengths(drafts)", "Rollback", "models.projection.no_such_thing"):
        assert problem(token) is not None, token
    for token in ("Replace", "models.projection.project", "accepted_lengths", "block_avg", "BetaMixtureThreshold"):
        assert problem(token) is None, token
