"""The audit trail shipped to a collector: DICOM Audit Messages over syslog (``[audit.syslog]``).

Each audit record (:mod:`dicom_node.audit`) of an event in :data:`EVENTS` becomes one DICOM
Audit Message (PS3.15 A.5, the XML form IHE ATNA uses), sent as an RFC 5424 syslog message
(facility authpriv, severity notice, MSGID ``IHE+RFC-3881``, the XML after a UTF-8 byte order
mark) in an RFC 6587 octet-counted frame, over TCP or TLS (RFC 5425) to an audit record
repository.

Sending never blocks or fails the action it records: records wait in a bounded queue
(``audit.syslog.queue_size``) for one background thread. While the collector cannot be reached
the thread retries (backing off up to :data:`MAX_BACKOFF_SECONDS`) and the queue fills; records
that find it full are dropped. Both are counted in ``/metrics``
(``dicom_node_audit_export_messages_total{outcome="sent"|"dropped"}``).

Messages are patient-free like the records they come from: the user is the name the audit
trail records, the study is named by its opaque study key, by its Study Instance UID
(``audit.syslog.participant = "study-uid"``, what an ATNA repository correlates on) or not at
all; never a patient name or ID. Records made in this process are sent: ``dicom-node serve``'s
main process, which serves HTTP (logins, patient data reads, actions, audit reads) and starts and
stops the node; the receiver processes' records (associations) stay in the database.
"""

from dicom_node.atna.messages import EVENTS, audit_message, kind_of, split_actor, syslog_frame
from dicom_node.atna.sender import SyslogExporter

__all__ = ["EVENTS", "SyslogExporter", "audit_message", "kind_of", "split_actor", "syslog_frame"]
