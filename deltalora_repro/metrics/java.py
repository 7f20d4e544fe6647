"""The Java tools behind the official NLG scores, run exactly as the official scripts run them.

Three jars ship inside the PyPI package ``pycocoevalcap`` (1.2) and are used from there, so
nothing is downloaded at run time:

- ``meteor/meteor-1.5.jar`` with ``meteor/data/paraphrase-en.gz``: METEOR 1.5. It is called in
  two ways, each as one official tool calls it:
  * coco-caption's protocol (``-stdio``), used by tuetschek/e2e-metrics for E2E:
    ``java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm``, then one
    ``SCORE ||| ref_1 ||| ... ||| ref_k ||| hyp`` line per segment (answered by a line of
    sufficient statistics) and one ``EVAL ||| stats_1 ||| ... ||| stats_n`` line, answered by n
    segment scores and the corpus score, which is what e2e-metrics reports (meteor_stdio).
  * file mode, used by WebNLG/GenerationEval:
    ``java -Xmx2G -jar meteor-1.5.jar HYP_FILE REF_FILE -l en -norm -r N`` with N references per
    hypothesis on consecutive lines; the corpus score is the "Final score:" line (meteor_files).
- ``tokenizer/stanford-corenlp-3.4.1.jar``: the PTB tokenizer that coco-caption runs on every
  caption before METEOR, ROUGE-L and CIDEr (ptb_tokenize).

SPICE (``spice/``) is never used: it downloads Stanford CoreNLP models on first use.

The LoRA repository's WebNLG pipeline reported METEOR = -1 (LoRA issue #138): GenerationEval
splits its input files on "\\n", a file ending with a newline gains an empty last entry, the
hypothesis and reference files then disagree in length, METEOR prints "Error: test and reference
not same length", and the script turns the failure into -1. Here the files are written from Python
lists with exactly one line per segment (each ending in "\\n", which Java's line reader counts the
same way as a last line without one, so an empty last segment is not lost), the line counts are
checked before the jar runs, and any failure raises MetricToolError instead of returning a number.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..progress import stage

JAVA_MISSING = (
    "the official METEOR 1.5 and PTB tokenizer jars need a Java runtime, and no `java` was found on "
    "PATH. Install one (Debian/Ubuntu: `apt-get install -y default-jre-headless`; any Java >= 8 "
    "works) or set JAVA_HOME."
)

# METEOR's JVM heap, as both official callers set it.
_METEOR_HEAP = "-Xmx2G"


class MetricToolError(RuntimeError):
    """An official scoring tool (a jar) is missing or failed."""


def java_executable() -> str:
    """Path of the `java` binary: JAVA_HOME/bin/java if set, else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise MetricToolError(JAVA_MISSING)
    return found


def pycocoevalcap_dir() -> Path:
    """The installed pycocoevalcap package folder (a namespace package: no __init__.py)."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MetricToolError(
            "the package `pycocoevalcap` (which ships the METEOR 1.5 and Stanford PTB tokenizer jars) "
            "is not installed: `pip install pycocoevalcap`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged(*parts: str) -> Path:
    path = pycocoevalcap_dir().joinpath(*parts)
    if not path.is_file():
        raise MetricToolError(f"{path} is missing from the installed pycocoevalcap; reinstall it")
    return path


def meteor_jar() -> Path:
    jar = _packaged("meteor", "meteor-1.5.jar")
    _packaged("meteor", "data", "paraphrase-en.gz")  # METEOR looks for it beside the jar
    return jar


def ptb_jar() -> Path:
    return _packaged("tokenizer", "stanford-corenlp-3.4.1.jar")


def _one_line(text: str) -> str:
    # A segment is one line of a line-based file or protocol; coco-caption also replaces "\n".
    return text.replace("\r", " ").replace("\n", " ")


# ------------------------------------------------------------------------------------------------
# PTB tokenizer (coco-caption's tokenizer/ptbtokenizer.py)

# Tokens coco-caption drops after PTB tokenization.
COCO_PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                               ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def ptb_tokenize(sentences: list[str]) -> list[str]:
    """coco-caption's PTBTokenizer: Stanford PTBTokenizer with -preserveLines -lowerCase on a file
    with one sentence per line, then coco's punctuation tokens removed. One string per input."""
    if not sentences:
        return []
    java = java_executable()
    jar = ptb_jar()
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        path = Path(tmp) / "sentences.txt"
        # As coco: "\n".join, no trailing newline.
        path.write_bytes("\n".join(_one_line(s) for s in sentences).encode("utf-8"))
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", str(path)]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        raise MetricToolError(f"PTB tokenizer failed (exit {proc.returncode}): "
                              f"{proc.stderr.decode('utf-8', 'replace')[-2000:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    # coco zips these lines with its inputs; a count below the input count would silently misalign.
    if len(lines) < len(sentences):
        raise MetricToolError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in COCO_PUNCTUATIONS)
            for line in lines[:len(sentences)]]


# ------------------------------------------------------------------------------------------------
# METEOR 1.5, coco-caption's -stdio protocol (e2e-metrics)

def meteor_stdio(hypotheses: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
    """METEOR as coco-caption's Meteor.compute_score computes it: (corpus score, segment scores).

    Inputs are used as given (coco passes PTB-tokenized, lowercased text); METEOR's -norm
    normalises them again. The hypothesis is cleaned as coco cleans it ("|||" removed, double
    spaces halved); the references are not.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if not hypotheses:
        raise ValueError("nothing to score")
    java = java_executable()
    jar = meteor_jar()
    cmd = [java, "-jar", _METEOR_HEAP, jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err)
        try:
            stats = []
            for hyp, refs in zip(hypotheses, references):
                if not refs:
                    raise ValueError("every hypothesis needs at least one reference")
                hyp = _one_line(hyp).replace("|||", "").replace("  ", " ")
                line = " ||| ".join(["SCORE", " ||| ".join(_one_line(r) for r in refs), hyp])
                stats.append(_ask(proc, err, line))
            _send(proc, err, " ||| ".join(["EVAL"] + stats))
            segment_scores = [float(_read(proc, err)) for _ in stats]
            score = float(_read(proc, err))
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.kill()
            proc.wait()
    return score, segment_scores


def _send(proc: subprocess.Popen, err, line: str) -> None:
    try:
        proc.stdin.write((line + "\n").encode("utf-8"))
        proc.stdin.flush()
    except BrokenPipeError:
        raise MetricToolError("METEOR exited early: " + _tail(err)) from None


def _read(proc: subprocess.Popen, err) -> str:
    out = proc.stdout.readline()
    if not out:
        raise MetricToolError("METEOR exited early: " + _tail(err))
    return out.decode("utf-8").strip()


def _ask(proc: subprocess.Popen, err, line: str) -> str:
    _send(proc, err, line)
    return _read(proc, err)


def _tail(err) -> str:
    err.seek(0)
    return err.read().decode("utf-8", "replace")[-2000:] or "(no message)"


# ------------------------------------------------------------------------------------------------
# METEOR 1.5, file mode (WebNLG GenerationEval)

_FINAL = re.compile(rb"^Final score:\s+(\S+)\s*$", re.M)


def meteor_files(hypotheses: list[str], references: list[list[str]]) -> float:
    """METEOR as GenerationEval's meteor_score computes it, for hypotheses that each have the same
    number N of references (the -r N of the command line). Returns the corpus ("Final") score."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if not hypotheses:
        raise ValueError("nothing to score")
    num_refs = {len(r) for r in references}
    if len(num_refs) != 1 or 0 in num_refs:
        raise ValueError(f"file-mode METEOR needs the same number of references for every "
                         f"hypothesis, got counts {sorted(num_refs)}")
    n = num_refs.pop()
    java = java_executable()
    jar = meteor_jar()
    hyp_lines = [_one_line(h) for h in hypotheses]
    ref_lines = [_one_line(r) for refs in references for r in refs]
    with tempfile.TemporaryDirectory(prefix="meteor-") as tmp:
        hyp_path, ref_path = Path(tmp) / "hypothesis", Path(tmp) / "reference"
        # One "\n"-terminated line per segment: the jar's line reader then sees exactly
        # len(hyp_lines) and len(ref_lines) lines, empty last segments included (issue #138).
        hyp_path.write_bytes("".join(x + "\n" for x in hyp_lines).encode("utf-8"))
        ref_path.write_bytes("".join(x + "\n" for x in ref_lines).encode("utf-8"))
        assert _count_lines(hyp_path) * n == _count_lines(ref_path) == len(ref_lines)
        cmd = [java, _METEOR_HEAP, "-jar", str(jar), str(hyp_path), str(ref_path),
               "-l", "en", "-norm", "-r", str(n)]
        proc = subprocess.run(cmd, cwd=jar.parent, stdin=subprocess.DEVNULL, capture_output=True)
    match = _FINAL.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        msg = (proc.stdout[-1000:] + proc.stderr[-2000:]).decode("utf-8", "replace")
        raise MetricToolError(f"METEOR failed (exit {proc.returncode}): {msg}")
    return float(match.group(1))


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def run_parallel(jobs: dict[str, tuple]) -> dict[str, object]:
    """Run several (function, *args) jobs in threads (each starts its own JVM) and collect the
    results by name; the first failure is re-raised."""
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def work(name, fn, args):
        try:
            with stage(f"scoring {name} ({getattr(fn, '__name__', fn)})"):
                results[name] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name, job[0], job[1:])) for name, job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
