//! The fixed newstyle handshake: greeting, client flags, then options until `NBD_OPT_GO`
//! or `NBD_OPT_EXPORT_NAME` (async, as it may wait for a reclaim). A [`Negotiation`] holds
//! what was agreed so far and answers each option with one method, returning a [`Step`].
//!
//! With TLS required, every option but `STARTTLS` and `ABORT` before TLS is answered
//! `NBD_REP_ERR_TLS_REQD` (and `EXPORT_NAME`, which has no error reply, closes): no export
//! is listed, described or served in clear text.

use std::sync::Arc;

use pdguard_engine::service::{NbdExport, Service};

use super::backend::Backend;
use super::connection::{read_frame, Allowance, ConnError, Inbox, Sock};
use super::server::ConnConfig;
use super::tls;
use super::wire::{self, info, opt, rep, tflag, Frame};

/// Largest option data accepted during the handshake.
pub const MAX_OPTION: u32 = 64 << 10;
/// The metadata context id of `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// The block sizes advertised: minimum, preferred, and the maximum a READ or WRITE is
/// answered in one buffer (larger ones are streamed; see `transmit`).
pub const BLOCK_MIN: u32 = 1;
pub const BLOCK_PREFERRED: u32 = 4096;
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// What the handshake agreed on, for transmission.
pub struct Agreed {
    pub export: NbdExport,
    pub backend: Backend,
    pub structured: bool,
    pub meta: bool,
}

/// What to do after an option.
pub enum Step {
    /// Send these bytes and read the next option.
    Reply(Vec<u8>),
    /// Send the ack, then run the TLS handshake.
    StartTls(Vec<u8>),
    /// Send these bytes, then enter transmission.
    Transmit(Vec<u8>, Box<Agreed>),
    /// Send these bytes (if any), then close.
    Close(Vec<u8>),
}

/// The state of one connection's option haggling.
pub struct Negotiation<'a> {
    svc: &'a Service,
    cfg: &'a ConnConfig,
    /// The container name of the connection's association.
    id: &'a str,
    client: wire::ClientFlags,
    structured: bool,
    /// The export for which `base:allocation` was selected, if any.
    meta_for: Option<String>,
    /// The TLS session is up.
    tls_done: bool,
    /// The connection is associated with its disk (to undo at the end).
    pub attached: bool,
}

pub fn transmission_flags(structured: bool) -> u16 {
    // CAN_MULTI_CONN holds: every connection to a disk does positional I/O on the same
    // file through the same page cache, and FLUSH/FUA call fdatasync, which persists the
    // file's dirty pages whichever descriptor wrote them.
    let mut f = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_TRIM
        | tflag::SEND_WRITE_ZEROES
        | tflag::SEND_CACHE
        | tflag::CAN_MULTI_CONN;
    if structured {
        // A READ of at most MAX_PAYLOAD is answered with a single content chunk.
        f |= tflag::SEND_DF;
    }
    f
}

fn describe(e: &NbdExport) -> String {
    format!(
        "pdguard disk {} ({} bytes, {})",
        e.name,
        e.size,
        e.state.name()
    )
}

impl<'a> Negotiation<'a> {
    pub fn new(svc: &'a Service, cfg: &'a ConnConfig, id: &'a str) -> Self {
        Self {
            svc,
            cfg,
            id,
            client: wire::ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true,
            },
            structured: false,
            meta_for: None,
            tls_done: false,
            attached: false,
        }
    }

    fn tls(&self) -> Option<&Arc<tls::Tls>> {
        self.cfg.tls.as_ref()
    }

    /// Answer one option.
    pub async fn option(&mut self, code: u32, data: Vec<u8>) -> Step {
        let tls_missing = self.tls().is_some_and(|t| t.required()) && !self.tls_done;
        if tls_missing && !matches!(code, opt::STARTTLS | opt::ABORT) {
            return self.tls_required(code);
        }
        match code {
            opt::EXPORT_NAME => self.export_name(data).await,
            opt::ABORT => Step::Close(wire::option_reply(code, rep::ACK, &[])),
            opt::LIST => self.list(&data).await,
            opt::INFO | opt::GO => self.info_or_go(code, &data).await,
            opt::STRUCTURED_REPLY => self.structured_reply(&data),
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(code, &data).await,
            opt::STARTTLS => self.starttls(&data),
            other => Step::Reply(wire::option_error(
                other,
                rep::ERR_UNSUP,
                &format!("option {other} is not supported by pdguard"),
            )),
        }
    }

    fn tls_required(&self, code: u32) -> Step {
        if code == opt::EXPORT_NAME {
            // No error reply exists for this option: close (proto.md "NBD_OPT_EXPORT_NAME").
            tracing::info!(conn = %self.id, "NBD_OPT_EXPORT_NAME before TLS; closed");
            return Step::Close(Vec::new());
        }
        Step::Reply(wire::option_error(
            code,
            rep::ERR_TLS_REQD,
            "this server requires TLS: negotiate NBD_OPT_STARTTLS first",
        ))
    }

    fn starttls(&mut self, data: &[u8]) -> Step {
        let fail = |t: u32, m: &str| Step::Reply(wire::option_error(opt::STARTTLS, t, m));
        if self.tls().is_none() {
            return fail(
                rep::ERR_UNSUP,
                "TLS is not configured on this server (--nbd-tls-certs or --nbd-tls-psk)",
            );
        }
        if !data.is_empty() {
            return fail(rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        }
        if self.tls_done {
            return fail(rep::ERR_INVALID, "TLS is already negotiated");
        }
        // What was agreed in clear text is forgotten (proto.md "TLS support").
        self.structured = false;
        self.meta_for = None;
        Step::StartTls(wire::option_reply(opt::STARTTLS, rep::ACK, &[]))
    }

    async fn export_name(&mut self, data: Vec<u8>) -> Step {
        let Ok(name) = String::from_utf8(data) else {
            tracing::info!(conn = %self.id, "NBD_OPT_EXPORT_NAME with a name that is not UTF-8; closed");
            return Step::Close(Vec::new());
        };
        match self.go(&name).await {
            Ok(agreed) => {
                let out = wire::export_name_reply(
                    agreed.export.size,
                    transmission_flags(self.structured),
                    self.client.no_zeroes,
                );
                Step::Transmit(out, Box::new(agreed))
            }
            // No error reply exists for this option: an export it cannot serve closes the
            // connection (proto.md "NBD_OPT_EXPORT_NAME").
            Err(why) => {
                tracing::warn!(conn = %self.id, error = %ConnError::Export { name, why }, "NBD connection closed");
                Step::Close(Vec::new())
            }
        }
    }

    async fn list(&mut self, data: &[u8]) -> Step {
        if !data.is_empty() {
            let m = "NBD_OPT_LIST takes no data";
            return Step::Reply(wire::option_error(opt::LIST, rep::ERR_INVALID, m));
        }
        let mut out = Vec::new();
        for e in self.svc.nbd_exports().await {
            out.extend(wire::option_reply(
                opt::LIST,
                rep::SERVER,
                &wire::rep_server(&e.name, &describe(&e)),
            ));
        }
        out.extend(wire::option_reply(opt::LIST, rep::ACK, &[]));
        Step::Reply(out)
    }

    async fn info_or_go(&mut self, code: u32, data: &[u8]) -> Step {
        let fail = |t: u32, m: &str| Step::Reply(wire::option_error(code, t, m));
        let req = match wire::parse_info_request(data) {
            Ok(r) => r,
            Err(e) => return fail(rep::ERR_INVALID, &e.0),
        };
        let found = if code == opt::GO {
            self.go(&req.name)
                .await
                .map(|a| (a.export.clone(), Some(a)))
        } else {
            self.svc
                .nbd_export(&req.name)
                .await
                .map(|e| (e, None))
                .map_err(|e| pdguard_engine::error_chain(&e))
        };
        let (export, agreed) = match found {
            Ok(x) => x,
            Err(why) => return fail(rep::ERR_UNKNOWN, &why),
        };
        let reply = |d: &[u8]| wire::option_reply(code, rep::INFO, d);
        let mut out = reply(&wire::info_export(
            export.size,
            transmission_flags(self.structured),
        ));
        out.extend(reply(&wire::info_block_size(
            BLOCK_MIN,
            BLOCK_PREFERRED,
            MAX_PAYLOAD,
        )));
        out.extend(reply(&wire::info_string(
            info::DESCRIPTION,
            &describe(&export),
        )));
        if req.infos.contains(&info::NAME) {
            out.extend(reply(&wire::info_string(info::NAME, &export.name)));
        }
        out.extend(wire::option_reply(code, rep::ACK, &[]));
        match agreed {
            Some(a) => Step::Transmit(out, Box::new(a)),
            None => Step::Reply(out),
        }
    }

    fn structured_reply(&mut self, data: &[u8]) -> Step {
        let code = opt::STRUCTURED_REPLY;
        if !data.is_empty() {
            let m = "NBD_OPT_STRUCTURED_REPLY takes no data";
            return Step::Reply(wire::option_error(code, rep::ERR_INVALID, m));
        }
        self.structured = true;
        Step::Reply(wire::option_reply(code, rep::ACK, &[]))
    }

    /// The replies to a LIST or SET of meta contexts.
    async fn meta_context(&mut self, code: u32, data: &[u8]) -> Step {
        let set = code == opt::SET_META_CONTEXT;
        if set {
            // Replaces the selection, even when it fails.
            self.meta_for = None;
        }
        let fail = |t: u32, m: &str| Step::Reply(wire::option_error(code, t, m));
        if !self.structured {
            let m = "negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts";
            return fail(rep::ERR_INVALID, m);
        }
        let req = match wire::parse_meta_request(data) {
            Ok(r) => r,
            Err(e) => return fail(rep::ERR_INVALID, &e.0),
        };
        if let Err(e) = self.svc.nbd_export(&req.name).await {
            return fail(rep::ERR_UNKNOWN, &pdguard_engine::error_chain(&e));
        }
        let mut out = Vec::new();
        if wire::base_allocation_matches(&req.queries, !set) {
            // LIST replies carry the reserved id 0; SET assigns ours.
            let ctx = if set { BASE_ALLOCATION_ID } else { 0 };
            out.extend(wire::option_reply(
                code,
                rep::META_CONTEXT,
                &wire::rep_meta_context(ctx, wire::BASE_ALLOCATION),
            ));
            if set {
                self.meta_for = Some(req.name);
            }
        }
        out.extend(wire::option_reply(code, rep::ACK, &[]));
        Step::Reply(out)
    }

    /// Enter transmission on `name`: associate the connection with the disk (a copy
    /// reclaim waits for the unseal; an instant one for its migration to start) and claim
    /// the disk's I/O handle.
    async fn go(&mut self, name: &str) -> Result<Agreed, String> {
        let chain = |e: pdguard_engine::service::ServiceError| pdguard_engine::error_chain(&e);
        // Unknown names fail before any association.
        self.svc.nbd_export(name).await.map_err(chain)?;
        // nbd_attach undoes the association itself when the reclaim fails.
        let export = self.svc.nbd_attach(self.id, name).await.map_err(chain)?;
        self.attached = true;
        // Only the file recorded for the disk: a swapped one fails the disk, unserved.
        let io = match self.svc.claim(name).await {
            Ok(io) => io.hold(self.cfg.hold),
            Err(e) => {
                self.svc.nbd_detach(self.id).await;
                self.attached = false;
                return Err(chain(e));
            }
        };
        let backend = Backend::new(io);
        Ok(Agreed {
            meta: self.meta_for.as_deref() == Some(name),
            export,
            backend,
            structured: self.structured,
        })
    }
}

/// Run one option, watching the socket meanwhile: a client that hangs up while its option
/// runs — `NBD_OPT_GO` waits for a reclaim's unseal, which can take minutes — is gone at
/// once (`None`). Dropping the option's future undoes the association `nbd_attach` made, so
/// the disk's life goes on without the client (docs/instant-reclaim.md section 8: held by
/// nobody when the unseal ends, it enters its grace period and is sealed again). Bytes the
/// client sends meanwhile stay in the inbox for the next frame.
async fn option_unless_hung_up(
    neg: &mut Negotiation<'_>,
    code: u32,
    data: Vec<u8>,
    inbox: &mut Inbox,
    sock: &mut Sock,
) -> Option<Step> {
    let id = neg.id;
    let option = neg.option(code, data);
    tokio::pin!(option);
    let mut watching = true;
    loop {
        let more = tokio::select! {
            step = &mut option => return Some(step),
            r = inbox.fill(sock, inbox.len() + 1), if watching => r,
        };
        match more {
            // The client said more (the next frame): no longer watched, kept for later.
            Ok(true) => watching = false,
            Ok(false) | Err(_) => {
                tracing::info!(conn = %id, option = code, "the client hung up while its option ran; dropping it");
                return None;
            }
        }
    }
}

/// Run the handshake on `sock`. Returns the socket (the clear-text end after TLS), what was
/// left in the inbox, and what was agreed (`None`: the client left or was closed).
pub async fn run(
    mut sock: Sock,
    inbox: &mut Inbox,
    neg: &mut Negotiation<'_>,
) -> Result<(Sock, Option<Box<Agreed>>), ConnError> {
    let mut allowance = Allowance::new(neg.cfg.handshake_timeout);
    sock.write_all(&wire::greeting()).await?;
    let Some((flags, n)) =
        read_frame(inbox, &mut sock, &mut allowance, wire::parse_client_flags).await?
    else {
        return Ok((sock, None));
    };
    inbox.consume(n);
    neg.client = flags;
    loop {
        let parse = |b: &[u8]| {
            Ok(match wire::parse_option(b, MAX_OPTION)? {
                Frame::Complete(o, n) => Frame::Complete((o.code, o.data.to_vec()), n),
                Frame::Incomplete { need } => Frame::Incomplete { need },
            })
        };
        let Some(((code, data), n)) = read_frame(inbox, &mut sock, &mut allowance, parse).await?
        else {
            return Ok((sock, None));
        };
        inbox.consume(n);
        let Some(step) = option_unless_hung_up(neg, code, data, inbox, &mut sock).await else {
            return Ok((sock, None));
        };
        match step {
            Step::Reply(out) => sock.write_all(&out).await?,
            Step::StartTls(ack) => {
                // Bytes sent after STARTTLS and before the TLS handshake would be read as
                // if they came through TLS: refuse them (the STARTTLS injection attack).
                if inbox.len() > 0 {
                    return Err(ConnError::DataAfterStartTls(inbox.len()));
                }
                sock.write_all(&ack).await?;
                let Some(t) = neg.tls().cloned() else {
                    return Ok((sock, None));
                };
                let left = allowance.left();
                sock = allowance.wait(tls::upgrade(sock, &t, left)).await??;
                neg.tls_done = true;
                tracing::debug!(conn = %neg.id, kind = t.kind, "NBD TLS session");
            }
            Step::Transmit(out, agreed) => {
                sock.write_all(&out).await?;
                return Ok((sock, Some(agreed)));
            }
            Step::Close(out) => {
                if !out.is_empty() {
                    sock.write_all(&out).await?;
                }
                return Ok((sock, None));
            }
        }
    }
}
