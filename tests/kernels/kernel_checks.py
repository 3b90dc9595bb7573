"""The one comparison metric of the kernel tests."""


def assert_close(actual, expected, rtol, floor=1e-8):
    """Relative RMS error ||a - b|| / max(||b||, floor) <= rtol; NaN fails."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not actual.isnan().any() and not expected.isnan().any(), "NaN"
    a, b = actual.double(), expected.double()
    err = ((a - b).norm() / max(b.norm().item(), floor)).item()
    assert err <= rtol, f"relative RMS error {err:.3e} > {rtol:.1e}"
