"""nnU-Net's postprocessing.pkl, read with an allow-list (never unpickled freely) and applied as
nnU-Net's `apply_postprocessing` applies it."""

from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest

from nnslim.compiler.runtime.nnunet.postprocessing import apply_steps, read_steps
from nnslim.errors import InputError

MODULE = "nnunetv2.postprocessing.remove_connected_components"
NAME = "remove_all_but_largest_component_from_segmentation"


def nnunet_pickle(path, kwargs_list) -> None:
    """A postprocessing.pkl as nnU-Net writes it: (functions, keyword arguments), the function pickled
    by reference to nnU-Net's module (stood in for here: nnunetv2 need not be installed)."""
    fake = types.ModuleType(MODULE)

    def function(segmentation, labels_or_regions, background_label=0):  # pragma: no cover (never called)
        return segmentation

    function.__module__, function.__qualname__, function.__name__ = MODULE, NAME, NAME
    setattr(fake, NAME, function)
    saved = {k: sys.modules.get(k) for k in ("nnunetv2", "nnunetv2.postprocessing", MODULE)}
    sys.modules.update({"nnunetv2": types.ModuleType("nnunetv2"),
                        "nnunetv2.postprocessing": types.ModuleType("nnunetv2.postprocessing"), MODULE: fake})
    try:
        path.write_bytes(pickle.dumps(([function] * len(kwargs_list), kwargs_list)))
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def test_reads_nnunets_steps_and_keeps_the_largest_component(tmp_path):
    nnunet_pickle(tmp_path / "postprocessing.pkl", [{"labels_or_regions": [1, 2]},
                                                    {"labels_or_regions": np.int64(2)}])
    steps = read_steps(tmp_path / "postprocessing.pkl")
    assert steps == [{"function": "remove_all_but_largest_component", "regions": [[1], [2]], "background_label": 0},
                     {"function": "remove_all_but_largest_component", "regions": [[2]], "background_label": 0}]
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[1:6, 1:6, 1:6] = 1          # 125 voxels of 1, touching ...
    labels[6:8, 1:6, 1:6] = 2          # ... 50 of 2: one foreground component of 175
    labels[12:15, 12:15, 12:15] = 2    # 27 of 2, apart: removed by step 1 (union), not by step 2
    labels[17:19, 17:19, 17:19] = 1    # 8 of 1, apart: removed by step 1
    out = apply_steps(labels, steps)
    expected = labels.copy()
    expected[12:15, 12:15, 12:15] = 0
    expected[17:19, 17:19, 17:19] = 0
    np.testing.assert_array_equal(out, expected)
    assert labels[12, 12, 12] == 2  # the input is left as it was
    diagonal = np.zeros((5, 5, 5), np.uint8)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = 1  # corner neighbours: one component (26-connectivity)
    diagonal[4, 4, 0] = 1
    assert apply_steps(diagonal, steps[:1]).sum() == 2


def test_anything_else_in_the_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(([Payload()], [{"labels_or_regions": 1}])))
    with pytest.raises(InputError, match="system, which nnslim does not run"):
        read_steps(tmp_path / "evil.pkl")
    assert not marker.exists()
    (tmp_path / "odd.pkl").write_bytes(pickle.dumps({"not": "steps"}))
    with pytest.raises(InputError, match="nnU-Net's is \\(functions, keyword arguments\\)"):
        read_steps(tmp_path / "odd.pkl")
    nnunet_pickle(tmp_path / "args.pkl", [{"labels_or_regions": "everything"}])
    with pytest.raises(InputError, match="a label is an integer"):
        read_steps(tmp_path / "args.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x05not a pickle")
    with pytest.raises(InputError, match="not an nnU-Net postprocessing.pkl"):
        read_steps(tmp_path / "junk.pkl")


def test_numpy_values_become_integers_and_nothing_numpy_is_built(tmp_path):
    """A numpy dtype's pickled state cannot make a value out of raw bytes (a crafted one crashed numpy)."""
    import io

    nnunet_pickle(tmp_path / "ok.pkl", [{"labels_or_regions": [np.int64(1), np.uint8(2)], "background_label": np.int16(0)}])
    assert read_steps(tmp_path / "ok.pkl")[0]["regions"] == [[1], [2]]
    crafted = io.BytesIO()
    pickle.dump(([], []), crafted)
    payload = (b"\x80\x04cnumpy\ndtype\n(X\x02\x00\x00\x00V8K\x00K\x01tR(K\x03X\x01\x00\x00\x00|NNNK\x08K\x01K\x00tb"
               b"cnumpy.core.multiarray\nscalar\n(\x00\x00\x00\x00\x00\x00\x00\x00\x00C\x08AAAAAAAAtR.")
    (tmp_path / "v8.pkl").write_bytes(payload)
    with pytest.raises(InputError):
        read_steps(tmp_path / "v8.pkl")
    shared = [1]
    for _ in range(60):  # 60 levels of a list holding the one below twice: tiny as a pickle, 2**60 as a walk
        shared = [shared, shared]
    nnunet_pickle(tmp_path / "deep.pkl", [{"labels_or_regions": shared}])
    with pytest.raises(InputError, match="nested or repeated"):
        read_steps(tmp_path / "deep.pkl")
    nnunet_pickle(tmp_path / "bg.pkl", [{"labels_or_regions": 1, "background_label": (2, 3)}])
    with pytest.raises(InputError, match="background_label"):
        read_steps(tmp_path / "bg.pkl")


def test_an_integer_too_long_to_print_is_a_clear_error(tmp_path):
    nnunet_pickle(tmp_path / "long.pkl", [{"labels_or_regions": 10**5000}])
    with pytest.raises(InputError, match="an integer of 16610 bits"):
        read_steps(tmp_path / "long.pkl")


def test_what_the_steps_cannot_be_is_refused_before_any_label_map(tmp_path):
    from nnslim.compiler.runtime.nnunet.postprocessing import check_steps

    for kwargs, says in (({"labels_or_regions": [[1, 2]]}, "a label is an integer"),
                         ({"labels_or_regions": 1, "background_label": 300}, "0..255"),
                         ({"labels_or_regions": [1] * 300}, "lists 300 labels")):
        nnunet_pickle(tmp_path / "pp.pkl", [kwargs])
        with pytest.raises(InputError, match=says):
            read_steps(tmp_path / "pp.pkl")
    many = [{"function": "remove_all_but_largest_component", "regions": [[1]] * 200, "background_label": 0}] * 60
    with pytest.raises(InputError, match="more than 10000 labels"):
        check_steps(many)


def test_a_fifo_or_a_memo_bomb_is_read_without_waiting_or_allocating(tmp_path):
    import resource
    import struct

    os.mkfifo(tmp_path / "fifo.pkl")
    with pytest.raises(InputError, match="not a regular file"):
        read_steps(tmp_path / "fifo.pkl")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # PROTO 4, EMPTY_TUPLE, LONG_BINPUT 2**24, STOP: the C unpickler sizes its memo to 2**25 slots (256 MiB)
    (tmp_path / "memo.pkl").write_bytes(b"\x80\x04)r" + struct.pack("<I", 1 << 24) + b".")
    with pytest.raises(InputError):
        read_steps(tmp_path / "memo.pkl")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
