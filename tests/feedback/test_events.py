import os
import uuid

from feedback import FeedbackEvent, ThumbsFeedback
from feedback.events import _new_id


def test_event_ids_are_distinct_version_4_uuids_across_buffer_refills():
    ids = [_new_id() for _ in range(3 * 4096 // 16 + 7)]  # past three refills of the 4 KiB buffer
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(event_id).version == 4 and len(event_id) == 32 for event_id in ids)
    thumbs = ThumbsFeedback(type="thumbs", completion_id="chatcmpl-x", rating="up")
    assert FeedbackEvent(feedback=thumbs).event_id != FeedbackEvent(feedback=thumbs).event_id


def test_a_forked_child_does_not_repeat_its_parents_ids():
    _new_id()  # the buffer holds unread ids the child would otherwise hand out too
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, _new_id().encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read, 64).decode() != _new_id()
