//! Credentials from the EC2 instance metadata service (IMDSv2), as the AWS
//! CLI takes them on an instance with a role: a session token first, then
//! the role's temporary keys. Tried only when nothing else gives keys, with
//! short deadlines so that a machine off EC2 does not wait.

use std::time::Duration;

/// The service's address unless `AWS_EC2_METADATA_SERVICE_ENDPOINT` says.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";

/// Temporary keys of the instance's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleKeys {
    /// The role's name.
    pub role: String,
    /// Access key id.
    pub key: String,
    /// Secret access key.
    pub secret: String,
    /// Session token.
    pub token: String,
}

/// Asks the service at `endpoint` for the role's keys; None when there is
/// no service, no role, or an answer that is not keys.
pub fn role_keys(endpoint: &str) -> Option<RoleKeys> {
    let base = endpoint.trim_end_matches('/');
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .timeout_connect(Some(Duration::from_millis(500)))
        .build()
        .into();
    let text = |r: Result<ureq::http::Response<ureq::Body>, ureq::Error>| -> Option<String> {
        let mut r = r.ok()?;
        if r.status() != 200 {
            return None;
        }
        r.body_mut().with_config().limit(64 << 10).read_to_string().ok()
    };
    let token = text(
        agent
            .put(format!("{base}/latest/api/token"))
            .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
            .send_empty(),
    )?;
    let token = token.trim();
    let roles = text(
        agent
            .get(format!("{base}/latest/meta-data/iam/security-credentials/"))
            .header("x-aws-ec2-metadata-token", token)
            .call(),
    )?;
    let role = roles.lines().next()?.trim().to_string();
    if role.is_empty() || role.contains('/') {
        return None;
    }
    let doc = text(
        agent
            .get(format!("{base}/latest/meta-data/iam/security-credentials/{role}"))
            .header("x-aws-ec2-metadata-token", token)
            .call(),
    )?;
    let v: serde_json::Value = serde_json::from_str(&doc).ok()?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    Some(RoleKeys {
        role,
        key: field("AccessKeyId")?,
        secret: field("SecretAccessKey")?,
        token: field("Token")?,
    })
}
