"""Real gRPC servers on free localhost ports over a real store (local directory or moto's S3)."""

from __future__ import annotations

import pytest

from fluxlora.common.storage import LocalStore
from support import ServiceProcess, services_and_client


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from fluxlora.models.tiny_captioner import write_tiny_florence2
    from fluxlora.models.tiny_flux import write_tiny_flux

    root = tmp_path_factory.mktemp("models")
    return {"flux": write_tiny_flux(root / "tiny-flux"), "florence2": write_tiny_florence2(root / "tiny-florence2")}


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """family name -> that family's tiny model (`fluxlora models write-tiny --family`), written once a session."""
    from fluxlora.models.tiny_family import write_tiny_family

    written = {}

    def model(family: str):
        if family not in written:
            written[family] = write_tiny_family(family, tmp_path_factory.mktemp("models") / f"tiny-{family}")
        return written[family]

    return model


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    from fluxlora.demo.sample_data import write_sample_photos

    folder = tmp_path_factory.mktemp("photos")
    write_sample_photos(folder, count=4, seed=1)
    return folder


@pytest.fixture
def running(store, tmp_path):
    """The four services and an SDK client, sharing `store` (parametrised: local and S3)."""
    with services_and_client(store, tmp_path) as client:
        yield client


@pytest.fixture
def cli_env(monkeypatch, tmp_path):
    """Four servers on a local store, with the environment pointing the CLI at them."""
    store = LocalStore(tmp_path / "store")
    with services_and_client(store, tmp_path) as client:
        monkeypatch.setenv("FLUXLORA_STORE", str(store.root))
        monkeypatch.setenv("COLUMNS", "250")  # rich wraps table cells to the terminal width
        for service, address in client.addresses.items():
            monkeypatch.setenv(f"FLUXLORA_{service.upper()}_ADDR", address)
        yield client


@pytest.fixture
def processes():
    """Server processes a test appends once started (ServiceProcess.start()); each is stopped at the end."""
    started: list[ServiceProcess] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def kube(tmp_path, monkeypatch):
    """A fake Kubernetes API with Kueue (LocalQueue fluxlora/fluxlora -> ClusterQueue fluxlora-gpu), which
    the real kubernetes client reaches through a kubeconfig."""
    from deploy.kube_fakes import FakeKubeAPI, use_kubeconfig

    api = FakeKubeAPI().start()
    api.local_queues[("fluxlora", "fluxlora")] = "fluxlora-gpu"
    use_kubeconfig(api, tmp_path, monkeypatch, "fluxlora")
    yield api
    api.stop()
