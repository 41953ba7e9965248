/*
 * Prints, as key=value lines, the sizes, offsets and constants of the Xen
 * PV-SCSI, ring, xenstore, xenbus, gntdev and evtchn ABIs that bridge/xen
 * relies on, taken from Debian's libxen-dev headers (and linux-libc-dev's
 * xen/sys ioctl headers). tests/unit/xen/test_abi.py compares them with the
 * Python definitions.
 */
#include <stddef.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>

#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/vscsiif.h>
#include <xen/io/xenbus.h>
#include <xen/io/xs_wire.h>
#include <xen/sys/gntdev.h>
#include <xen/sys/evtchn.h>

#define P(name, value) printf("%s=%lld\n", name, (long long)(value))
#define OFF(prefix, type, field) P(prefix "." #field, offsetof(type, field))

int main(void)
{
    /* vscsiif.h */
    P("request.size", sizeof(struct vscsiif_request));
    OFF("request", struct vscsiif_request, rqid);
    OFF("request", struct vscsiif_request, act);
    OFF("request", struct vscsiif_request, cmd_len);
    OFF("request", struct vscsiif_request, cmnd);
    OFF("request", struct vscsiif_request, timeout_per_command);
    OFF("request", struct vscsiif_request, channel);
    OFF("request", struct vscsiif_request, id);
    OFF("request", struct vscsiif_request, lun);
    OFF("request", struct vscsiif_request, ref_rqid);
    OFF("request", struct vscsiif_request, sc_data_direction);
    OFF("request", struct vscsiif_request, nr_segments);
    OFF("request", struct vscsiif_request, seg);
    OFF("request", struct vscsiif_request, reserved);
    P("response.size", sizeof(struct vscsiif_response));
    OFF("response", struct vscsiif_response, rqid);
    OFF("response", struct vscsiif_response, act);
    OFF("response", struct vscsiif_response, sense_len);
    OFF("response", struct vscsiif_response, sense_buffer);
    OFF("response", struct vscsiif_response, rslt);
    OFF("response", struct vscsiif_response, residual_len);
    OFF("response", struct vscsiif_response, reserved);
    P("segment.size", sizeof(struct scsiif_request_segment));
    OFF("segment", struct scsiif_request_segment, gref);
    OFF("segment", struct scsiif_request_segment, offset);
    OFF("segment", struct scsiif_request_segment, length);
    P("VSCSIIF_ACT_SCSI_CDB", VSCSIIF_ACT_SCSI_CDB);
    P("VSCSIIF_ACT_SCSI_ABORT", VSCSIIF_ACT_SCSI_ABORT);
    P("VSCSIIF_ACT_SCSI_RESET", VSCSIIF_ACT_SCSI_RESET);
    P("VSCSIIF_ACT_SCSI_SG_PRESET", VSCSIIF_ACT_SCSI_SG_PRESET);
    P("VSCSIIF_SG_TABLESIZE", VSCSIIF_SG_TABLESIZE);
    P("VSCSIIF_MAX_COMMAND_SIZE", VSCSIIF_MAX_COMMAND_SIZE);
    P("VSCSIIF_SENSE_BUFFERSIZE", VSCSIIF_SENSE_BUFFERSIZE);
    P("VSCSIIF_PAGE_SIZE", VSCSIIF_PAGE_SIZE);
    P("VSCSIIF_SG_GRANT", VSCSIIF_SG_GRANT);
    P("VSCSIIF_SG_PER_PAGE", VSCSIIF_SG_PER_PAGE);
    P("XEN_VSCSIIF_RSLT_RESET_SUCCESS", XEN_VSCSIIF_RSLT_RESET_SUCCESS);
    P("XEN_VSCSIIF_RSLT_RESET_FAILED", XEN_VSCSIIF_RSLT_RESET_FAILED);
    P("XEN_VSCSIIF_RSLT_HOST(0x00070002)", XEN_VSCSIIF_RSLT_HOST(0x00070002));
    P("XEN_VSCSIIF_RSLT_STATUS(0x00070002)", XEN_VSCSIIF_RSLT_STATUS(0x00070002));
#define H(x) P("RsltHost." #x, XEN_VSCSIIF_RSLT_HOST_##x)
    H(OK); H(NO_CONNECT); H(BUS_BUSY); H(TIME_OUT); H(BAD_TARGET); H(ABORT); H(PARITY);
    H(ERROR); H(RESET); H(BAD_INTR); H(PASSTHROUGH); H(SOFT_ERROR); H(IMM_RETRY); H(REQUEUE);
    H(TRANSPORT_DISRUPTED); H(TRANSPORT_FAILFAST); H(TARGET_FAILURE); H(NEXUS_FAILURE);
    H(ALLOC_FAILURE); H(MEDIUM_ERROR); H(TRANSPORT_MARGINAL);

    /* ring.h via DEFINE_RING_TYPES(vscsiif, ...) */
    P("ring.size", __CONST_RING_SIZE(vscsiif, 4096));
    OFF("sring", struct vscsiif_sring, req_prod);
    OFF("sring", struct vscsiif_sring, req_event);
    OFF("sring", struct vscsiif_sring, rsp_prod);
    OFF("sring", struct vscsiif_sring, rsp_event);
    OFF("sring", struct vscsiif_sring, ring);
    P("sring.entry_size", sizeof(union vscsiif_sring_entry));

    /* xs_wire.h */
    P("xsd_sockmsg.size", sizeof(struct xsd_sockmsg));
    OFF("xsd_sockmsg", struct xsd_sockmsg, type);
    OFF("xsd_sockmsg", struct xsd_sockmsg, req_id);
    OFF("xsd_sockmsg", struct xsd_sockmsg, tx_id);
    OFF("xsd_sockmsg", struct xsd_sockmsg, len);
    P("XENSTORE_PAYLOAD_MAX", XENSTORE_PAYLOAD_MAX);
    P("XENSTORE_ABS_PATH_MAX", XENSTORE_ABS_PATH_MAX);
#define X(x) P("XsType." #x, XS_##x)
    X(CONTROL); X(DIRECTORY); X(READ); X(GET_PERMS); X(WATCH); X(UNWATCH);
    X(TRANSACTION_START); X(TRANSACTION_END); X(INTRODUCE); X(RELEASE); X(GET_DOMAIN_PATH);
    X(WRITE); X(MKDIR); X(RM); X(SET_PERMS); X(WATCH_EVENT); X(ERROR);
    X(IS_DOMAIN_INTRODUCED); X(RESUME); X(SET_TARGET); X(RESET_WATCHES); X(DIRECTORY_PART);
    for (unsigned i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)
        printf("xsd_errors.%u=%s\n", i, xsd_errors[i].errstring);

    /* xenbus.h */
#define S(x, n) P("XenbusState." n, XenbusState##x)
    S(Unknown, "UNKNOWN"); S(Initialising, "INITIALISING"); S(InitWait, "INIT_WAIT");
    S(Initialised, "INITIALISED"); S(Connected, "CONNECTED"); S(Closing, "CLOSING");
    S(Closed, "CLOSED"); S(Reconfiguring, "RECONFIGURING"); S(Reconfigured, "RECONFIGURED");

    /* gntdev.h / evtchn.h ioctls */
    P("IOCTL_GNTDEV_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF);
    P("IOCTL_GNTDEV_UNMAP_GRANT_REF", IOCTL_GNTDEV_UNMAP_GRANT_REF);
    P("IOCTL_GNTDEV_SET_MAX_GRANTS", IOCTL_GNTDEV_SET_MAX_GRANTS);
    P("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY);
    P("map_grant_ref.size", sizeof(struct ioctl_gntdev_map_grant_ref));
    OFF("map_grant_ref", struct ioctl_gntdev_map_grant_ref, count);
    OFF("map_grant_ref", struct ioctl_gntdev_map_grant_ref, index);
    OFF("map_grant_ref", struct ioctl_gntdev_map_grant_ref, refs);
    P("grant_ref.size", sizeof(struct ioctl_gntdev_grant_ref));
    P("unmap_grant_ref.size", sizeof(struct ioctl_gntdev_unmap_grant_ref));
    OFF("unmap_grant_ref", struct ioctl_gntdev_unmap_grant_ref, index);
    OFF("unmap_grant_ref", struct ioctl_gntdev_unmap_grant_ref, count);
    P("grant_copy.size", sizeof(struct ioctl_gntdev_grant_copy));
    OFF("grant_copy", struct ioctl_gntdev_grant_copy, segments);
    P("grant_copy_segment.size", sizeof(struct ioctl_gntdev_grant_copy_segment));
    OFF("grant_copy_segment", struct ioctl_gntdev_grant_copy_segment, source);
    OFF("grant_copy_segment", struct ioctl_gntdev_grant_copy_segment, dest);
    OFF("grant_copy_segment", struct ioctl_gntdev_grant_copy_segment, len);
    OFF("grant_copy_segment", struct ioctl_gntdev_grant_copy_segment, flags);
    OFF("grant_copy_segment", struct ioctl_gntdev_grant_copy_segment, status);
    OFF("grant_copy_segment", struct ioctl_gntdev_grant_copy_segment, source.foreign.ref);
    OFF("grant_copy_segment", struct ioctl_gntdev_grant_copy_segment, source.foreign.offset);
    OFF("grant_copy_segment", struct ioctl_gntdev_grant_copy_segment, source.foreign.domid);
    P("GNTCOPY_source_gref", GNTCOPY_source_gref);
    P("GNTCOPY_dest_gref", GNTCOPY_dest_gref);
    P("GNTST_okay", GNTST_okay);
    P("IOCTL_EVTCHN_BIND_INTERDOMAIN", IOCTL_EVTCHN_BIND_INTERDOMAIN);
    P("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND);
    P("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY);
    return 0;
}
