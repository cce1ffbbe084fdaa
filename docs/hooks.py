"""Brings the benchmark results into the site, so no figure is copied by hand.

The tables of `benchmarks/results/*.md` are included by `pymdownx.snippets`
(see mkdocs.yml). This hook does the rest:

- it adds the PNG plots and the JSON files of `benchmarks/results/` to the
  site, where they keep their path (`benchmarks/results/NAME`);
- pages link to those files as they sit in the repository
  (`../../benchmarks/results/NAME`), so that the links also work when a page
  is read as source; the hook points such links at the site's copy;
- a line `<!-- epoch-times: benchmarks/results/overhead_BACKEND.json -->`
  becomes the table of epoch times in that file (the overhead benchmark
  writes no markdown);
- it warns (an error under `mkdocs build --strict`) when a table or a plot
  of `benchmarks/results/` appears on no page, so that a new result cannot
  be forgotten.
"""

import json
import os
import posixpath
import re

from mkdocs.exceptions import PluginError
from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import File

log = get_plugin_logger(__name__)

RESULTS = "benchmarks/results"
# Files of RESULTS served as they are; the markdown tables are included instead.
SERVED_SUFFIXES = (".png", ".json")
# Files of RESULTS that some page must show.
SHOWN_SUFFIXES = (".md", ".png")

LINK = re.compile(r"(\]\()([^)\s]+)(\))")
SNIPPET = re.compile(r'--8<--\s+"(' + re.escape(RESULTS) + r'/[^":]+)')
EPOCH_TIMES = re.compile(r"^<!-- epoch-times: (\S+) -->$", re.MULTILINE)

RUN_NAMES = {
    "scratch": "student from scratch",
    "on_the_fly": "`kd_keras.Distiller`, teacher on the fly",
    "cached": "`kd_keras.Distiller`, cached teacher logits",
    "keras_distillation": "`keras.distillation.Distiller`",
}

LIBRARY_NAMES = {
    "keras": "Keras",
    "tensorflow": "TensorFlow",
    "jax": "JAX",
    "torch": "PyTorch",
}

_shown = set()


def _root(config):
    return os.path.dirname(os.path.abspath(config.config_file_path))


def _results(config):
    folder = os.path.join(_root(config), RESULTS)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def on_pre_build(config):
    _shown.clear()


def on_files(files, config):
    for name in _results(config):
        if name.endswith(SERVED_SUFFIXES):
            files.append(
                File(
                    f"{RESULTS}/{name}",
                    src_dir=_root(config),
                    dest_dir=config.site_dir,
                    use_directory_urls=config.use_directory_urls,
                )
            )
    return files


def _point_at_site_copy(markdown, page):
    """`../../benchmarks/results/x.png` (from docs/) -> `results/x.png`."""
    page_dir = posixpath.dirname(page.file.src_uri)

    def replace(match):
        target = match.group(2)
        if not target.startswith("../"):
            return match.group(0)
        # The target as a path from the repository root.
        in_repo = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if not in_repo.startswith(RESULTS + "/"):
            return match.group(0)
        _shown.add(in_repo)
        in_site = posixpath.relpath(in_repo, page_dir or ".")
        return f"{match.group(1)}{in_site}{match.group(3)}"

    return LINK.sub(replace, markdown)


def _number(value, digits):
    return f"{value:.{digits}f}"


def epoch_times_table(path):
    """The markdown table of one `benchmarks/overhead.py` result file."""
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    env = result.get("environment", {})
    backend = env.get("backend", "")
    versions = ", ".join(
        f"{LIBRARY_NAMES.get(name, name)} {env[name]}"
        for name in ("keras", backend)
        if env.get(name)
    )
    devices = ", ".join(env.get("devices", []))
    seconds = [row["min_epoch_seconds"] for row in result["rows"]]
    # Three significant figures whatever the device: 2.11 s on a CPU, 0.306 s on a GPU.
    digits = max(2, 2 - int(f"{min(seconds):e}".split("e")[1]))
    lines = [
        f"{result['heading']}. {versions}; {env.get('cpus', '?')} CPU cores; "
        f"devices: {devices}.",
        "",
        "| run | s / epoch | × scratch | × `keras.distillation` | target |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        target = row.get("target", "").replace("<=", "≤")
        target = target.replace("keras_distillation", "`keras.distillation`")
        lines.append(
            f"| {RUN_NAMES.get(row['run'], row['run'])} "
            f"| {_number(row['min_epoch_seconds'], digits)} "
            f"| {_number(row['ratio_to_scratch'], 2)} "
            f"| {_number(row['ratio_to_keras_distillation'], 2)} "
            f"| {target} |"
        )
    return "\n".join(lines)


def _render_epoch_times(markdown, config):
    def replace(match):
        relative = match.group(1)
        path = os.path.join(_root(config), relative)
        if not os.path.isfile(path):
            raise PluginError(f"epoch-times: no file {relative}")
        _shown.add(posixpath.normpath(relative))
        return epoch_times_table(path)

    return EPOCH_TIMES.sub(replace, markdown)


def on_page_markdown(markdown, page, config, files):
    _shown.update(SNIPPET.findall(markdown))
    markdown = _render_epoch_times(markdown, config)
    return _point_at_site_copy(markdown, page)


def on_post_build(config):
    for name in _results(config):
        path = f"{RESULTS}/{name}"
        if name.endswith(SHOWN_SUFFIXES) and path not in _shown:
            log.warning(f"{path} appears on no page; include it in docs/benchmarks/")
