"""A page as headless Chromium shows it: which images loaded, at what size, and which links
and anchors lead somewhere. Debian's ``chromium`` is installed with apt-get when missing (the
test set-up runs as root in CI); elsewhere the caller skips."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

# Appended to a copy of the page: once every image has loaded or failed (the load event), the
# browser's own view of them is written into the DOM, which --dump-dom prints.
_PROBE = """<script>
window.addEventListener('load', () => {
  const here = location.href.split('#')[0];
  const images = [...document.images].map(i => ({
    src: i.getAttribute('src'), url: i.src, complete: i.complete,
    natural: [i.naturalWidth, i.naturalHeight],
    shown: [i.getBoundingClientRect().width, i.getBoundingClientRect().height]}));
  const links = [...document.querySelectorAll('a[href]')].map(a => ({
    href: a.getAttribute('href'), url: a.href.split('#')[0],
    anchor: a.hash ? decodeURIComponent(a.hash.slice(1)) : null,
    same_page: a.href.split('#')[0] === here,
    found: a.hash ? !!document.getElementById(decodeURIComponent(a.hash.slice(1))) : null}));
  const out = document.createElement('pre');
  out.id = '__probe__';
  out.textContent = JSON.stringify({images, links});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    """The Chromium binary, installed from Debian's packages when missing and we are root."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or shutil.which("apt-get") is None or os.geteuid() != 0:
        return found
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
        capture_output=True, env=env, timeout=900,
    )  # fmt: skip
    return shutil.which("chromium")


def _run(binary: str, *args: str) -> str:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def probe(binary: str, page: Path) -> dict:
    """Images and links of ``page`` as the browser loaded them.

    Each link gets ``broken``: a same-page anchor with no element of that id, or a link to a
    local file that does not exist (links off this machine are not followed)."""
    copy = page.with_name(f".probe-{page.name}")
    copy.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    try:
        dom = _run(binary, "--virtual-time-budget=20000", "--dump-dom", copy.as_uri())
    finally:
        copy.unlink()
    found = re.search(r'<pre id="__probe__">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run in {page}: {dom[-500:]}"
    seen = json.loads(html.unescape(found.group(1)))
    for link in seen["links"]:
        url = urlparse(link["url"])
        if link["same_page"] or link["url"] == copy.as_uri():
            link["broken"] = link["anchor"] is not None and not link["found"]
        elif url.scheme == "file":
            link["broken"] = not Path(unquote(url.path)).exists()
        else:
            link["broken"] = False
    return seen


def screenshot(binary: str, page: Path, out: Path, size: str = "1200,4000") -> Path:
    """A PNG of ``page`` at ``size`` (width,height)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(binary, f"--window-size={size}", f"--screenshot={out}", page.as_uri())
    return out
