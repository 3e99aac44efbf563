"""The web page in a real headless browser: Debian's chromium, driven by chromium-driver through
Selenium (an explicit Service: Selenium Manager never downloads anything).

A pulled-through image (skopeo, a docker-registry upstream) shows with its tag, digest and size;
a bundle made by skopeo is uploaded from the page; logout locks the pages again. Screenshots of
the overview and of a repository page go to tests/artifacts/.
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


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless chromium with a fresh profile; chromedriver and chromium stopped after the test,
    by their process ids, even when it fails."""
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
        "--window-size=1280,900",
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


def shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    metrics = {
        "width": 1280,
        "height": max(720, min(height, 2400)),
        "deviceScaleFactor": 1,
        "mobile": False,
    }
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


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
    shot(d, "overview.png")

    # projects -> repositories (search) -> the repository -> its tag, digest, size
    d.find_element(By.LINK_TEXT, "Repositories").click()
    wait(d).until(EC.presence_of_element_located((By.ID, "projects")))
    d.find_element(By.LINK_TEXT, "spectro-images").click()
    box = wait(d).until(EC.presence_of_element_located((By.ID, "q")))
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
    shot(d, "repository.png")
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

    # log out: the pages are refused again
    d.find_element(By.ID, "logout").click()
    wait(d).until(EC.presence_of_element_located((By.ID, "username")))
    d.get(base + f"/ui/repositories/{repo}")
    wait(d).until(EC.presence_of_element_located((By.ID, "username")))
    assert "/ui/login" in d.current_url
    d.get(base + "/ui/api/overview")
    assert "log in first" in d.find_element(By.TAG_NAME, "body").text
