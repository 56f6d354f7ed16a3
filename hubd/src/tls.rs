//! TLS for MQTT: loading the CA, client certificate and key, the client id from the
//! certificate's CN, and the rustls client configuration (ring provider). The files are read
//! once ([`read`]) and built from those bytes ([`build`]), so what [`crate::rotation`] checked
//! is what is used.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::TlsFiles;

/// Why the TLS material cannot be used (at start-up, or a renewed set).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading the {what} {}: {error}", path.display())]
    Read {
        /// Which file it is meant to be.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error (in the message, so it is not repeated as a cause).
        error: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("the {what} {} {message}", path.display())]
    Content {
        /// Which file it is meant to be.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the combination.
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Loaded TLS material.
#[derive(Debug)]
pub struct TlsMaterial {
    /// The rustls configuration to hand to rumqttc.
    pub config: Arc<ClientConfig>,
    /// The CN of the client certificate, when mutual TLS is configured and it has one.
    pub client_cn: Option<String>,
    /// The file contents it was built from.
    pub bytes: TlsBytes,
}

/// The contents of the TLS files, as read at one moment.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsBytes {
    /// The CA certificate file.
    pub ca: Vec<u8>,
    /// The client certificate and key files, for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key's bytes in a log.
        f.debug_struct("TlsBytes")
            .field("ca", &self.ca.len())
            .field("client", &self.client.as_ref().map(|(c, _)| c.len()))
            .finish_non_exhaustive()
    }
}

const CA_CERT: &str = "MQTT TLS CA certificate";
const CLIENT_CERT: &str = "MQTT TLS client certificate";
const CLIENT_KEY: &str = "MQTT TLS client key";

/// Reads the files of `files`.
pub fn read(files: &TlsFiles) -> Result<TlsBytes, TlsError> {
    let ca = read_file(CA_CERT, &files.ca_cert)?;
    let client = match &files.client {
        Some((cert, key)) => Some((read_file(CLIENT_CERT, cert)?, read_file(CLIENT_KEY, key)?)),
        None => None,
    };
    Ok(TlsBytes { ca, client })
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

fn content(what: &'static str, path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Content {
        what,
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Certificates from a PEM file, or the whole file as one DER certificate when it holds no PEM.
fn parse_certs(
    what: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &bytes[..])
        .collect::<Result<_, _>>()
        .map_err(|e| content(what, path, format!("is not valid PEM: {e}")))?;
    if !certs.is_empty() {
        // PEM only says base64: each must be a certificate, or rustls refuses it unnamed.
        for (n, cert) in certs.iter().enumerate() {
            x509_parser::parse_x509_certificate(cert).map_err(|e| {
                content(
                    what,
                    path,
                    format!(
                        "holds a PEM block that is not a certificate (#{}): {e}",
                        n + 1
                    ),
                )
            })?;
        }
        return Ok(certs);
    }
    // EVP accepts DER too; check that it parses before handing it on.
    x509_parser::parse_x509_certificate(bytes).map_err(|e| {
        content(
            what,
            path,
            format!("holds no PEM certificate and is not DER: {e}"),
        )
    })?;
    Ok(vec![CertificateDer::from(bytes.to_vec())])
}

fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    match rustls_pemfile::private_key(&mut &bytes[..]) {
        Ok(Some(key)) => Ok(key),
        Ok(None) if !bytes.starts_with(b"-----") => Ok(PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(bytes.to_vec()),
        )),
        Ok(None) => Err(content(CLIENT_KEY, path, "holds no private key")),
        Err(e) => Err(content(CLIENT_KEY, path, format!("is not valid PEM: {e}"))),
    }
}

/// The first CN of a DER certificate's subject.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Loads the files and builds the rustls configuration. The broker's certificate is verified
/// against the CA (server name: the MQTT host) unless `insecure_skip_verify`.
pub fn load(files: &TlsFiles, insecure_skip_verify: bool) -> Result<TlsMaterial, TlsError> {
    build(files, read(files)?, insecure_skip_verify)
}

/// Builds the rustls configuration from the contents of `files` (their paths name them in
/// errors): as [`load`], without reading anything.
pub fn build(
    files: &TlsFiles,
    bytes: TlsBytes,
    insecure_skip_verify: bool,
) -> Result<TlsMaterial, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_certs = parse_certs(CA_CERT, &files.ca_cert, &bytes.ca)?;
    let mut roots = RootCertStore::empty();
    for cert in ca_certs {
        roots
            .add(cert)
            .map_err(|e| content(CA_CERT, &files.ca_cert, format!("is not a usable CA: {e}")))?;
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer {
                algorithms: provider.signature_verification_algorithms,
            }))
    } else {
        builder.with_root_certificates(roots)
    };
    let (config, client_cn) = match (&files.client, &bytes.client) {
        (Some((cert_path, key_path)), Some((cert, key))) => {
            let chain = parse_certs(CLIENT_CERT, cert_path, cert)?;
            let client_cn = chain.first().and_then(|c| common_name(c));
            let key = parse_key(key_path, key)?;
            let config = builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| match e {
                    // A renewal tool caught between writing the certificate and the key.
                    rustls::Error::InconsistentKeys(_) => content(
                        CLIENT_KEY,
                        key_path,
                        format!("is not the key of the certificate {}", cert_path.display()),
                    ),
                    e => TlsError::Rustls(e),
                })?;
            (config, client_cn)
        }
        (Some((cert_path, _)), None) => {
            return Err(content(CLIENT_CERT, cert_path, "was not read"));
        }
        (None, _) => (builder.with_no_client_auth(), None),
    };
    Ok(TlsMaterial {
        config: Arc::new(config),
        client_cn,
        bytes,
    })
}

/// Development only (`tls_insecure_skip_verify`): accepts any broker certificate, but still
/// checks the handshake signatures so the session keys belong to the certificate shown.
#[derive(Debug)]
struct AcceptAnyServer {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CA and a client certificate signed by it, written as PEM files in `dir`.
    pub(crate) fn write_pki(dir: &Path, cn: &str) -> TlsFiles {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test ca");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("client.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("client.key"), key.serialize_pem()).unwrap();
        TlsFiles {
            ca_cert: dir.join("ca.pem"),
            client: Some((dir.join("client.pem"), dir.join("client.key"))),
        }
    }

    #[test]
    fn client_id_is_the_certificate_cn() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pki(dir.path(), "device-0042");
        let m = load(&files, false).unwrap();
        assert_eq!(m.client_cn.as_deref(), Some("device-0042"));
        let server_only = TlsFiles {
            client: None,
            ..files.clone()
        };
        assert_eq!(load(&server_only, true).unwrap().client_cn, None);
    }

    #[test]
    fn der_ca_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pki(dir.path(), "d");
        let pem = std::fs::read(&files.ca_cert).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .unwrap()
            .unwrap();
        std::fs::write(dir.path().join("ca.der"), der.as_ref()).unwrap();
        let files = TlsFiles {
            ca_cert: dir.path().join("ca.der"),
            client: None,
        };
        load(&files, false).unwrap();
    }

    #[test]
    fn a_pem_block_that_is_not_a_certificate_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pki(dir.path(), "d");
        let (cert, _) = files.client.clone().unwrap();
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load(&files, false).unwrap_err().to_string();
        assert!(
            e.contains("client certificate")
                && e.contains("client.pem")
                && e.contains("not a certificate"),
            "{e}"
        );
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pki(dir.path(), "d");
        let other = tempfile::tempdir().unwrap();
        write_pki(other.path(), "d");
        std::fs::copy(
            other.path().join("client.key"),
            dir.path().join("client.key"),
        )
        .unwrap();
        let e = load(&files, false).unwrap_err().to_string();
        assert!(
            e.contains("client.key is not the key of the certificate") && e.contains("client.pem"),
            "{e}"
        );
    }

    #[test]
    fn missing_or_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            ca_cert: dir.path().join("nope.pem"),
            client: None,
        };
        let e = load(&files, false).unwrap_err().to_string();
        assert!(
            e.contains("CA certificate") && e.contains("nope.pem"),
            "{e}"
        );
        std::fs::write(dir.path().join("junk.pem"), b"not a certificate").unwrap();
        let files = TlsFiles {
            ca_cert: dir.path().join("junk.pem"),
            client: None,
        };
        let e = load(&files, false).unwrap_err().to_string();
        assert!(e.contains("junk.pem"), "{e}");
        let mut good = write_pki(dir.path(), "d");
        good.client = Some((dir.path().join("client.pem"), dir.path().join("absent.key")));
        let e = load(&good, false).unwrap_err().to_string();
        assert!(e.contains("client key") && e.contains("absent.key"), "{e}");
    }
}
