"""What the events of a hotplug say: QEMU's ``DEVICE_DELETED`` and
``DEVICE_UNPLUG_GUEST_ERROR``, and the guest's ACPI ``_OST`` replies.

QEMU 7.2 reports a vCPU's removal as ``DEVICE_DELETED`` of its lapic child only
(``path = /machine/peripheral/<id>/lapic``); a virtio PCI device's ``virtio-backend``
child is deleted about 50 ms before the device itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qvm.store.pending import own_path

UNPLUG_EVENTS = ("DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR", "ACPI_DEVICE_OST")
OST_EVENT = "ACPI_DEVICE_OST"
# ACPI _OST source codes and the statuses of an eject request (ACPI 6.x, 6.3.5)
OST_INSERT = 1
OST_EJECT = 3
OST_EJECT_IN_PROGRESS = 0x84
OST_STATUS_TEXT = {
    1: "non-specific failure",
    2: "unrecognized notify code",
    3: "notification not supported",
    0x80: "device ejection not supported by the guest OS",
    0x81: "device in use by an application",
    0x82: "device busy",
    0x83: "ejection dependency is busy or not supported",
}


def ost_status_text(status: int) -> str:
    text = OST_STATUS_TEXT.get(status, "failure")
    return f"ACPI _OST status {status:#x}: {text}"


def match_unplug_event(
    event: dict[str, Any], ids: Iterable[str], children: bool = True
) -> tuple[str, str, str | None]:
    """(id, "deleted" | "refused", detail) for an event about one of ``ids``, else ("", "", None).

    With ``children``, the deletion of a child (a vCPU's lapic) counts as the device's;
    without, only the device itself does.
    """
    name = event.get("event")
    data = event.get("data") or {}
    for dev_id in ids:
        path = data.get("path") or ""
        own = own_path(dev_id)
        about = (
            data.get("device") == dev_id or path == own or (children and path.startswith(own + "/"))
        )
        if name == "DEVICE_DELETED" and about:
            return dev_id, "deleted", None
        if name == "DEVICE_UNPLUG_GUEST_ERROR" and about:
            return dev_id, "refused", "the guest reported an error unplugging it"
        if name == OST_EVENT:
            info = data.get("info") or {}
            status = info.get("status", 0)
            if (
                info.get("device") == dev_id
                and info.get("source") == OST_EJECT
                and status not in (0, OST_EJECT_IN_PROGRESS)
            ):
                return dev_id, "refused", f"the guest refused the eject ({ost_status_text(status)})"
    return "", "", None


def insert_ack(event: dict[str, Any], ids: Iterable[str]) -> tuple[str, bool, str | None] | None:
    """(id, accepted, why not) for the guest's ``_OST`` reply to the insert of one of
    ``ids``, else None."""
    info = (event.get("data") or {}).get("info") or {}
    dev_id = info.get("device")
    if not isinstance(dev_id, str) or dev_id not in ids or info.get("source") != OST_INSERT:
        return None
    status = info.get("status", 0)
    return dev_id, status == 0, None if status == 0 else ost_status_text(status)
