"""BigEarthNet's official 43-to-19 class conversion, held here as literals.

Transcribed from the class lists and ``label_converter`` of torchgeo's torchgeo/datasets/bigearthnet.py
(commit 029863d), which reproduce label_indices.json of the BigEarthNet 19-class models repository
(git.tu-berlin.de/rsim/BigEarthNet-S2_19-classes_models). Indices 3-10, 30, 32 and 37 have no 19-class
partner: they are dropped.
"""

from __future__ import annotations

import pytest

from pipeline.sources.bigearthnet import BIGEARTHNET_19_CLASSES, CORINE_43_TO_19, label_vector, to_19_classes

CLASSES_43 = [
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
    "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities",
    "Non-irrigated arable land", "Permanently irrigated land", "Rice fields", "Vineyards",
    "Fruit trees and berry plantations", "Olive groves", "Pastures", "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest", "Natural grassland",
    "Moors and heathland", "Sclerophyllous vegetation", "Transitional woodland/shrub", "Beaches, dunes, sands",
    "Bare rock", "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes", "Salines",
    "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons", "Estuaries", "Sea and ocean",
]
CLASSES_19 = [
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops", "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas", "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub", "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands", "Inland waters",
    "Marine waters",
]
# 43-class index -> 19-class index (torchgeo's label_converter); absent = dropped.
CONVERTER = {
    0: 0, 1: 0, 2: 1, 11: 2, 12: 2, 13: 2, 14: 3, 15: 3, 16: 3, 18: 3, 17: 4, 19: 5, 20: 6, 21: 7, 22: 8, 23: 9,
    24: 10, 25: 11, 31: 11, 26: 12, 27: 12, 28: 13, 29: 14, 33: 15, 34: 15, 35: 16, 36: 16, 38: 17, 39: 17,
    40: 18, 41: 18, 42: 18,
}


def test_class_lists():
    assert list(BIGEARTHNET_19_CLASSES) == CLASSES_19
    assert sorted(CORINE_43_TO_19) == sorted(CLASSES_43) and len(CLASSES_43) == 43


def test_the_whole_43_to_19_table():
    expected = {name: (CLASSES_19[CONVERTER[i]] if i in CONVERTER else None) for i, name in enumerate(CLASSES_43)}
    assert CORINE_43_TO_19 == expected
    assert [CLASSES_43[i] for i in range(43) if i not in CONVERTER] == [
        "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
        "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities", "Bare rock",
        "Burnt areas", "Intertidal flats",
    ]


def test_coastal_wetlands_are_salt_marshes_and_salines_only():
    assert sorted(k for k, v in CORINE_43_TO_19.items() if v == "Coastal wetlands") == ["Salines", "Salt marshes"]
    assert to_19_classes(["Intertidal flats"]) == []
    assert to_19_classes(["Intertidal flats", "Sea and ocean", "Salines"]) == ["Coastal wetlands", "Marine waters"]
    assert label_vector(to_19_classes(["Salt marshes"])) == [int(i == 16) for i in range(19)]


def test_names_of_either_nomenclature_and_unknown_names():
    assert to_19_classes(["Pastures", "Urban fabric", "Rice fields"]) == ["Urban fabric", "Arable land", "Pastures"]
    with pytest.raises(KeyError):
        to_19_classes(["Tundra"])
