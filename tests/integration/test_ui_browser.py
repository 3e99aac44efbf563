"""The web page in a real headless browser: Debian's chromium, driven by chromium-driver through
Selenium (an explicit Service: Selenium Manager never downloads anything). One browser serves
the whole module.

A pulled-through image (skopeo, a docker-registry upstream) shows with its tag, digest and size;
a bundle made by skopeo is uploaded from the page; logout locks the pages again. Then every
page, at a desktop's 1440x900 and a phone's 390x844: no page is wider than the phone, the
header's links stay on screen, axe-core (vendored in tests/vendor/axe-core) finds no serious or
critical violation, in the light and the dark scheme. Screenshots of both widths go to
tests/artifacts/.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.images import make_image, make_index, write_layout
from tests.peers import REPO_ROOT, make_htpasswd, skopeo, skopeo_raw

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(
        not (shutil.which("chromium") and shutil.which("chromedriver")),
        reason="Debian's chromium and chromium-driver are missing",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PASSWORD = "browser-Pass-1"
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless chromium with a fresh profile, for the module; chromedriver and chromium stopped
    after it, by their process ids, even when a test fails."""
    tmp_path = tmp_path_factory.mktemp("chromium")
    profile = Path(tempfile.mkdtemp(prefix="regproxy-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        "--window-size=1440,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    service = Service(
        executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver",
        log_output=str(tmp_path / "chromedriver.log"),
    )
    driver = webdriver.Chrome(service=service, options=options)
    driver_pid = service.process.pid if service.process else None
    try:
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.quit()
        with contextlib.suppress(Exception):
            service.stop()
        if driver_pid is not None:  # still there (quit failed): end it and its chromium
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(driver_pid, signal.SIGKILL)
                os.waitpid(driver_pid, 0)
        _kill_profile_processes(profile)
        shutil.rmtree(profile, ignore_errors=True)


def _kill_profile_processes(profile: Path) -> None:
    """Chromium processes started with this test's own --user-data-dir (and only those)."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if f"--user-data-dir={profile}".encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_dir.name), signal.SIGKILL)


def wait(driver: Any, seconds: float = 15) -> Any:
    return WebDriverWait(driver, seconds)


def shot(driver: Any, name: str, size: tuple[int, int]) -> Path:
    """A screenshot of the whole page (up to 3000 px tall) at the emulated width."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    metrics = {"width": size[0], "deviceScaleFactor": 1, "mobile": size[0] < 600}
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {**metrics, "height": max(size[1], min(height, 3000))}
    )
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": size[1]})
    return path


DESKTOP = (1440, 900)
PHONE = (390, 844)
AXE = REPO_ROOT / "tests" / "vendor" / "axe-core" / "axe.min.js"


def emulate(driver: Any, size: tuple[int, int], *, dark: bool = False) -> None:
    width, height = size
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]},
    )


def axe_violations(driver: Any) -> list[str]:
    """axe-core's serious and critical violations on the page (rule, impact, where)."""
    if not driver.execute_script("return typeof window.axe !== 'undefined'"):
        driver.execute_script(AXE.read_text())  # through DevTools: the page's CSP does not apply
    found = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']})"
        ".then(r => done(r.violations.map(v => [v.id, v.impact,"
        " v.nodes.slice(0, 3).map(n => n.target.join(' ') + ': ' + n.failureSummary)])))"
        ".catch(e => done([['axe-error', 'critical', [String(e)]]]));"
    )
    return [
        f"{rule} ({impact}): {nodes}"
        for rule, impact, nodes in found
        if impact in ("serious", "critical")
    ]


def check_page(driver: Any, url: str | Any, name: str, *, dark_too: bool = False) -> None:
    """The page at both widths: fits the phone, header links on screen, no serious axe finding
    (light at both widths; dark too, at the desktop's, for the pages with every colour), a
    screenshot of each width."""
    problems = []
    runs = [(DESKTOP, False), (PHONE, False)] + ([(DESKTOP, True)] if dark_too else [])
    for size, dark in runs:
        emulate(driver, size, dark=dark)
        driver.get(url) if isinstance(url, str) else url()
        wait(driver).until(EC.presence_of_element_located((By.TAG_NAME, "main")))
        width = size[0]
        scroll = driver.execute_script("return document.documentElement.scrollWidth")
        if scroll > width:
            problems.append(f"{name} at {width}px is {scroll}px wide")
        hidden = driver.execute_script(
            "return [...document.querySelectorAll('header a, header button')]"
            ".filter(e => { const r = e.getBoundingClientRect();"
            " const s = getComputedStyle(e); return !(r.width > 0 && r.height > 0"
            " && r.left >= 0 && r.right <= window.innerWidth && s.visibility !== 'hidden'); })"
            ".map(e => e.textContent.trim() || e.className);"
        )
        if hidden:
            problems.append(f"{name} at {width}px: header items off screen: {hidden}")
        shot(driver, f"{name}-{width}{'-dark' if dark else ''}.png", size)
        problems += [
            f"{name} at {width}px{' dark' if dark else ''}: {v}" for v in axe_violations(driver)
        ]
    emulate(driver, DESKTOP)
    assert not problems, "\n".join(problems)


def log_in(driver: Any, base: str, password: str) -> None:
    driver.find_element(By.ID, "username").clear()
    driver.find_element(By.ID, "username").send_keys("alice")
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()


def test_browser_login_pull_through_upload_logout(
    tmp_path: Path, registry_factory, daemon_factory, browser
) -> None:
    # an upstream with an image, pulled through regproxy by skopeo
    up = registry_factory()
    img = make_image("amd64", layer_sizes=(4096, 300_000))
    a, b = make_image("amd64"), make_image("arm64")
    layout = tmp_path / "layout"
    write_layout(layout, {"v1": img, "multi": (make_index({"amd64": a, "arm64": b}), [a, b])})
    skopeo(
        "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{up.hostport}/team/app:v1"
    )
    htpasswd = make_htpasswd(tmp_path / "htpasswd", "alice", PASSWORD)
    proxy = daemon_factory(
        {
            "upstreams": {up.hostport: {"url": f"http://{up.hostport}", "alias": "up.test"}},
            "auth": {"htpasswd": str(htpasswd)},
        }
    )
    raw = skopeo_raw(f"{proxy.hostport}/up.test/team/app:v1")
    digest = sha(raw)
    assert digest == img.digest
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{proxy.hostport}/up.test/team/app:v1",
        f"dir:{tmp_path / 'pulled'}",
    )
    # a bundle made by skopeo, for the upload
    bundle = tmp_path / "bundle.tar"
    skopeo("copy", "--all", f"oci:{layout}:multi", f"oci-archive:{bundle}:docker.io/team/multi:2")

    d = browser
    d.delete_all_cookies()
    base = proxy.url
    # anonymous: the page sends the browser to the login form
    d.get(base + "/")
    wait(d).until(EC.presence_of_element_located((By.ID, "username")))
    assert "/ui/login" in d.current_url

    # a wrong password is refused
    log_in(d, base, "not-the-password")
    err = wait(d).until(EC.presence_of_element_located((By.ID, "login-error")))
    assert "Wrong user name or password" in err.text
    assert "/ui/login" in d.current_url

    # the right one gets in
    log_in(d, base, PASSWORD)
    wait(d).until(EC.presence_of_element_located((By.ID, "store-used")))
    assert d.current_url.endswith("/ui/")
    assert d.find_element(By.ID, "sync").text == "on"
    assert "127.0.0.1" in d.find_element(By.ID, "upstreams").text

    # Repositories (one project: its list at once) -> search -> the repository -> its tag
    d.find_element(By.LINK_TEXT, "Repositories").click()
    box = wait(d).until(EC.presence_of_element_located((By.ID, "q")))
    assert "project=spectro-images" in d.current_url
    box.send_keys("team/app")
    d.find_element(By.ID, "search").click()
    wait(d).until(EC.url_contains("q=team"))
    link = wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, "a.repo")))
    repo = "spectro-images/up.test/team/app"  # the upstream's alias names it
    assert link.text == repo, d.find_element(By.TAG_NAME, "main").text
    link.click()
    row = wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, "tr[data-tag='v1']")))
    assert row.find_element(By.CSS_SELECTOR, "a.digest").get_attribute("data-digest") == digest
    size = row.find_element(By.CSS_SELECTOR, "td.size").text
    want = len(img.manifest) + len(img.config) + sum(len(x) for x in img.layers)
    assert size == f"{want / 1024:.1f} KiB", (size, want)
    # the manifest: its layers
    row.find_element(By.CSS_SELECTOR, "a.digest").click()
    layers = wait(d).until(EC.presence_of_element_located((By.ID, "layers")))
    assert len(layers.find_elements(By.CSS_SELECTOR, "tbody tr")) == 3  # config and 2 layers

    # upload the bundle from the page: file input, progress, summary, images appear
    d.find_element(By.LINK_TEXT, "Upload bundle").click()
    wait(d).until(EC.presence_of_element_located((By.ID, "bundle"))).send_keys(str(bundle))
    d.find_element(By.ID, "upload").click()
    summary = wait(d, 30).until(EC.presence_of_element_located((By.ID, "summary")))
    assert "spectro-images/docker.io/team/multi:2" in summary.text
    assert d.find_element(By.ID, "progress-bar").get_attribute("value") == "100"
    summary.find_element(By.LINK_TEXT, "spectro-images/docker.io/team/multi:2").click()
    row = wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, "tr[data-tag='2']")))
    assert "linux/amd64" in row.text and "linux/arm64" in row.text and "pinned" in row.text

    multi = "spectro-images/docker.io/team/multi"
    index_digest = row.find_element(By.CSS_SELECTOR, "a.digest").get_attribute("data-digest")

    # the pull commands: copy buttons (shown by the script), the host-path form
    d.get(base + f"/ui/manifests/{repo}@{digest}")
    copy = wait(d).until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#pull button.copy")))
    assert copy.is_displayed()
    pull = d.find_element(By.ID, "pull").text
    assert f"docker pull {proxy.hostport}/{repo}@{digest}" in pull
    assert f"crictl pull {up.hostport}/team/app@{digest}" in pull
    assert "/bin/true" in d.find_element(By.ID, "image").text  # the image's command

    # a failed upload: the file's own name, the bar back to empty, an alert
    bad = tmp_path / "not-a-bundle.tar"
    bad.write_bytes(b"this is not a tar archive" * 100)
    d.get(base + "/ui/upload")
    wait(d).until(EC.presence_of_element_located((By.ID, "bundle"))).send_keys(str(bad))
    d.find_element(By.ID, "upload").click()
    err = wait(d, 30).until(EC.presence_of_element_located((By.ID, "upload-error")))
    assert "not-a-bundle.tar" in err.text and "/tmp" not in err.text and "--name" not in err.text
    assert err.get_attribute("role") == "alert"
    assert d.find_element(By.ID, "progress-bar").get_attribute("value") == "0"
    assert not d.find_element(By.ID, "progress").is_displayed()

    # every page at both widths, light and dark: fits, header on screen, no axe finding
    def confirm_page() -> None:  # what a browser without the script gets from Delete
        d.get(base + f"/ui/repositories/{multi}")
        form = wait(d).until(
            EC.presence_of_element_located((By.CSS_SELECTOR, "form[data-confirm]"))
        )
        d.execute_script(  # a copy of the form without the script's listener, as without JS
            "const f = arguments[0], c = f.cloneNode(true); c.removeAttribute('data-confirm');"
            "f.replaceWith(c); c.querySelector('button').click();",
            form,
        )
        wait(d).until(EC.presence_of_element_located((By.ID, "confirm-delete")))

    for path, name in (
        ("/ui/", "overview"),
        ("/ui/projects?all=1", "projects"),
        ("/ui/repositories?project=spectro-images&sort=size", "repositories"),
        (f"/ui/repositories/{repo}", "repository"),
        (f"/ui/repositories/{multi}", "repository-multi"),
        (f"/ui/manifests/{repo}@{digest}", "manifest"),
        (f"/ui/manifests/{multi}@{index_digest}", "manifest-index"),
        ("/ui/evict", "evict"),
        ("/ui/upload", "upload"),
        ("/ui/repositories/spectro-images/no/such/repo", "not-found"),
        ("/ui/logout", "logout"),
        (confirm_page, "confirm-delete"),
    ):
        dark = name in ("overview", "repository-multi", "manifest", "confirm-delete")
        check_page(d, base + path if isinstance(path, str) else path, name, dark_too=dark)

    # Delete with the script: one dialog, then done
    d.get(base + f"/ui/repositories/{multi}")
    d.execute_script("window.confirm = () => true")
    d.find_element(By.CSS_SELECTOR, "tr[data-tag='2'] button.danger").click()
    flash = wait(d).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".banner.ok")))
    assert "Deleted tag" in flash.text

    # log out: the pages are refused again
    d.find_element(By.ID, "logout").click()
    wait(d).until(EC.presence_of_element_located((By.ID, "username")))
    d.get(base + f"/ui/repositories/{repo}")
    wait(d).until(EC.presence_of_element_located((By.ID, "username")))
    assert "/ui/login" in d.current_url
    d.get(base + "/ui/api/overview")
    assert "log in first" in d.find_element(By.TAG_NAME, "body").text
    check_page(d, base + "/ui/login", "login")
