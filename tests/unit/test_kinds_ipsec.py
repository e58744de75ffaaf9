"""Whether a host runs IPsec is read from its desired resources, not from handler names."""

from __future__ import annotations

from reconciler.engine.observe import build_script
from reconciler.kinds.ipsec import runs_ipsec
from reconciler.kinds.resources import Desired, Domain, FileResource, Handler


def test_ipsec_is_observed_for_ipsec_resources_and_not_for_a_handler_name() -> None:
    named_only = Desired(host="h", handlers=(Handler("charon"),))
    swanctl = FileResource("/etc/swanctl/conf.d/mesh.conf", b"", Domain.IPSEC, handler="other-name")
    with_files = Desired(host="h", files=(swanctl,), handlers=(Handler("other-name"),))
    assert not runs_ipsec(named_only) and runs_ipsec(with_files)
    assert runs_ipsec(Desired(host="h", initiate=("a-b",)))
    assert "frame xfrm" not in build_script(named_only)[0]
    assert "frame xfrm" in build_script(with_files)[0] and "frame charon" in build_script(with_files)[0]
