"""olmoe-gatepro selftest on the CPU: --quick passes here, and a check made to fail says FAIL."""

import json

import pytest
import torch

import olmoe_gatepro.core.reference as reference_module
from olmoe_gatepro.cli import main
from olmoe_gatepro.pipelines.selftest import CHECKS, TIMED, format_report, run_selftest


def test_quick_selftest_passes_on_this_cpu(tmp_path, capsys):
    report = tmp_path / "selftest.json"
    code = main(["selftest", "--quick", "--json", str(report)])
    written = json.loads(report.read_text())
    statuses = {check["name"]: check["status"] for check in written["checks"]}
    assert list(statuses) == [name for name, _ in CHECKS]
    for name, status in statuses.items():
        if name in TIMED:  # measured, not asserted: a test never fails on a timing
            assert "GatePro / stock = " in next(c["figure"] for c in written["checks"] if c["name"] == name)
        elif name == "host syncs" and not torch.cuda.is_available():
            assert status == "SKIP"  # a check that cannot run here is never counted as passed
        else:
            assert status == "PASS", (name, written["checks"])
    assert code == (0 if written["passed"] else 1)
    out = capsys.readouterr().out
    assert "PASS  GatePro math" in out and "verdict: " in out


def _wrong_reference(logits, weight, penalty):
    """Penalises twice as much as the paper says: every check comparing with it must fail."""
    return reference_module.reference_gatepro(logits, weight, 2 * penalty + 0.5)


def test_a_check_made_to_fail_reports_fail():
    results = run_selftest(quick=True, reference=_wrong_reference, only=("GatePro math", "transformers router"),
                           echo=lambda _: None)
    assert [r.status for r in results] == ["FAIL", "FAIL"]
    assert "differs from the reference" in results[0].figure
    assert format_report(results).splitlines()[-1].startswith("verdict: FAIL (GatePro math, transformers router)")


def test_router_checks_fail_when_their_inputs_cannot_tell_a_patch_from_stock(monkeypatch):
    """A patch that does nothing, checked against a reference that penalises nothing, must not pass."""
    import olmoe_gatepro.olmo_core.patch as olmo_core_patch
    import olmoe_gatepro.transformers.patch as transformers_patch

    monkeypatch.setattr(transformers_patch, "patch_transformers", lambda **_: None)
    monkeypatch.setattr(olmo_core_patch, "patch_olmo_core", lambda **_: None)
    results = run_selftest(quick=True, reference=lambda logits, weight, penalty: logits,
                           only=("transformers router", "OLMo-core router"), echo=lambda _: None)
    assert [r.status for r in results] == ["FAIL", "FAIL"]
    assert all("the penalty moves no choice on these inputs" in r.figure for r in results)


def test_the_command_exits_non_zero_on_a_failed_check(monkeypatch, capsys):
    monkeypatch.setattr(reference_module, "reference_gatepro", _wrong_reference)
    assert main(["selftest", "--quick", "--only", "GatePro math"]) == 1
    assert "FAIL  GatePro math" in capsys.readouterr().out


def test_bad_selftest_flags(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["selftest", "--only", "nonsense"])
    assert exit_info.value.code == 2 and "unknown check(s) ['nonsense']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["selftest", "--json", str(tmp_path / "missing" / "report.json")])
    assert "not a file path in an existing folder" in capsys.readouterr().err
