"""Label tables: the published id maps, the Synthia subsets, export back to labelIds."""
import numpy as np

from eglp_dist.data import labels as L


def test_class_list_and_palette():
    assert L.NUM_CLASSES == len(L.CLASSES) == len(L.PALETTE) == 19
    assert L.IGNORE_INDEX == 255
    assert L.CLASSES[0] == "road" and L.CLASSES[10] == "sky" and L.CLASSES[18] == "bicycle"
    assert L.PALETTE[0] == (128, 64, 128) and L.PALETTE[13] == (0, 0, 142)


def test_cityscapes_label_ids_to_train_ids():
    lut = L.CITYSCAPES_ID_TO_TRAIN
    assert [int(lut[i]) for i in (7, 8, 11, 21, 23, 24, 26, 31, 33)] == [0, 1, 2, 8, 10, 11, 13, 16, 18]
    # everything that is not one of the 19 classes is ignored
    for void in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 255):
        assert lut[void] == 255
    assert (L.GTA5_ID_TO_TRAIN == lut).all()


def test_train_ids_export_back_to_label_ids():
    train = np.arange(19, dtype=np.uint8)
    ids = L.TRAIN_TO_CITYSCAPES_ID[train]
    assert (L.CITYSCAPES_ID_TO_TRAIN[ids] == train).all()
    assert L.TRAIN_TO_CITYSCAPES_ID[255] == 0


def test_synthia_16_bit_ids_and_subsets():
    lut = L.SYNTHIA_ID_TO_TRAIN
    assert lut.shape == (65536,)
    assert [int(lut[i]) for i in (3, 4, 2, 21, 1, 10, 8, 11)] == [0, 1, 2, 3, 10, 11, 13, 18]
    assert lut[0] == 255 and lut[13] == 255 and lut[22] == 255 and lut[1000] == 255
    assert len(L.SYNTHIA_16_CLASSES) == 16 and len(L.SYNTHIA_13_CLASSES) == 13
    names16 = {L.CLASSES[c] for c in L.SYNTHIA_16_CLASSES}
    assert {"terrain", "truck", "train"}.isdisjoint(names16)
    assert set(L.SYNTHIA_13_CLASSES) <= set(L.SYNTHIA_16_CLASSES)


def test_mapillary_v12_to_cityscapes():
    assert len(L.MAPILLARY_CLASSES) == 66
    lut = L.MAPILLARY_ID_TO_TRAIN
    idx = {n: i for i, n in enumerate(L.MAPILLARY_CLASSES)}
    assert lut[idx["construction--flat--road"]] == L.CLASS_INDEX["road"]
    assert lut[idx["marking--crosswalk-zebra"]] == L.CLASS_INDEX["road"]
    assert lut[idx["human--rider--motorcyclist"]] == L.CLASS_INDEX["rider"]
    assert lut[idx["object--vehicle--on-rails"]] == L.CLASS_INDEX["train"]
    assert lut[idx["void--unlabeled"]] == 255 and lut[idx["animal--bird"]] == 255
    assert set(lut[:66].tolist()) - {255} == set(range(19))  # every class reachable


def test_encodings_report_ids_outside_the_label_space():
    enc = L.ENCODINGS["trainid"]
    assert enc.invalid_ids(np.array([[0, 18, 255]], np.uint8)) == []
    assert enc.invalid_ids(np.array([[0, 19, 40]], np.uint8)) == [19, 40]
    assert L.ENCODINGS["cityscapes"].invalid_ids(np.array([[33, 34]], np.uint8)) == [34]
    assert L.ENCODINGS["synthia"].invalid_ids(np.array([[22, 23, 300]], np.uint16)) == [23, 300]


def test_colorize():
    rgb = L.colorize(np.array([[0, 255]], np.uint8))
    assert rgb.shape == (1, 2, 3) and tuple(rgb[0, 0]) == (128, 64, 128) and tuple(rgb[0, 1]) == (0, 0, 0)
