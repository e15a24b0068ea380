"""A clip message's note list: checked exactly as before, and a list sent again is not built again."""

import pytest

from engine.clip import Note
from plugin_bridge import note_list
from plugin_bridge.note_list import NoteListError, notes_of


def test_a_note_list_sent_again_gives_the_same_notes_without_building_them_again():
    sent = [[60, 90, 0, 1.0], [64, 80, 1.5, 0.5, 3]]
    first = notes_of(sent)
    assert first == (Note(60, 90, 0.0, 1.0, 0), Note(64, 80, 1.5, 0.5, 3))
    again = notes_of([list(n) for n in sent])  # the same content in a new message
    assert again is first
    assert notes_of([[60, 90, 0.0, 1], [64.0, 80, 1.5, 0.5, 3]]) is first  # 60 and 60.0 make the same Note


@pytest.mark.parametrize("bad", [True, float("nan"), float("inf"), 10**400, "60", None])
def test_a_value_that_equals_a_valid_one_in_a_tuple_is_still_refused(bad):
    """True == 1 and hash(True) == hash(1): a remembered [1, ...] must not answer for [True, ...]."""
    notes_of([[60, 90, 0, 1.0], [1, 90, 0, 1.0]])  # remembered: [True, ...] would compare equal to it
    with pytest.raises(NoteListError) as refused:
        notes_of([[60, 90, 0, 1.0], [bad, 90, 0, 1.0]])
    assert refused.value.index == 1
    assert "clip note 1 must be [pitch, velocity, start, duration(, channel)] numbers" in str(refused.value)


def test_notes_as_objects_and_malformed_entries():
    assert notes_of([{"pitch": 62, "velocity": 70, "start": 2, "duration": 1}]) == (Note(62, 70, 2.0, 1.0, 0),)
    for bad in ([60, 90, 0], [60, 90, 0, 1, 0, 0], "60 90 0 1", {"pitch": 60}):
        with pytest.raises(NoteListError):
            notes_of([bad])


def test_only_the_last_lists_are_kept():
    for start in range(note_list.KEPT_LISTS + 5):
        notes_of([[60, 90, float(start), 1.0]])
    assert len(note_list._kept) == note_list.KEPT_LISTS
    assert ((60, 90, 0.0, 1.0),) not in note_list._kept  # the oldest went first
