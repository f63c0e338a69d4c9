//! Where an S3 store is and who we are to it, found as the AWS CLI and
//! rclone users have it: flags, then environment variables, then the
//! profile in `~/.aws/credentials` and `~/.aws/config`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::Error;

/// What the command line says of the store; the rest comes from the
/// environment and the AWS files.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// `--s3-endpoint URL`: a store other than AWS (MinIO, Ceph, Garage,
    /// R2...). `http://` only when named so.
    pub endpoint: Option<String>,
    /// `--s3-region`.
    pub region: Option<String>,
    /// `--s3-profile`: the profile of the AWS files to use.
    pub profile: Option<String>,
}

/// Everything needed to sign a request to the store.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The store's URL (no bucket in it).
    pub endpoint: url::Url,
    /// Path-style addressing (`ENDPOINT/BUCKET/KEY`): the default for a
    /// custom endpoint; AWS itself gets virtual-hosted style.
    pub path_style: bool,
    /// The region signed for.
    pub region: String,
    /// Access key, secret and session token.
    pub key: String,
    /// The secret access key.
    pub secret: String,
    /// A session token, for temporary credentials.
    pub token: Option<String>,
    /// Where the credentials came from, for messages.
    pub from: String,
}

/// An INI file of the AWS kind: sections of `key = value` lines.
type Ini = HashMap<String, HashMap<String, String>>;

fn parse_ini(text: &str) -> Ini {
    let mut out = Ini::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

fn read_ini(path: &Path) -> Result<Option<Ini>, Error> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(parse_ini(&t))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Config(format!("{}: {e}", path.display()))),
    }
}

fn home_file(var: &str, name: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(p) = env(var) {
        return Some(PathBuf::from(p));
    }
    env("HOME").map(|h| Path::new(&h).join(".aws").join(name))
}

/// The instance role's keys, unless `AWS_EC2_METADATA_DISABLED` says not
/// to ask; `AWS_EC2_METADATA_SERVICE_ENDPOINT` moves the service.
fn imds_keys(env: &dyn Fn(&str) -> Option<String>) -> Option<crate::imds::RoleKeys> {
    if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    let endpoint = env("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| crate::imds::DEFAULT_ENDPOINT.into());
    crate::imds::role_keys(&endpoint)
}

/// Resolves `opts` against the environment `env` (a function, so tests
/// need not change the process's).
pub fn resolve(opts: &S3Options, env: &dyn Fn(&str) -> Option<String>) -> Result<Resolved, Error> {
    let nonempty = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let profile_named = opts.profile.clone().or_else(|| nonempty("AWS_PROFILE"));
    let profile = profile_named.clone().unwrap_or_else(|| "default".into());
    let creds_file = home_file("AWS_SHARED_CREDENTIALS_FILE", "credentials", &nonempty);
    let config_file = home_file("AWS_CONFIG_FILE", "config", &nonempty);
    let creds_ini = match &creds_file {
        Some(p) => read_ini(p)?,
        None => None,
    };
    let config_ini = match &config_file {
        Some(p) => read_ini(p)?,
        None => None,
    };
    // ~/.aws/config names profiles `[profile NAME]`, but `[default]`.
    let config_section = config_ini.as_ref().and_then(|c| {
        c.get(&format!("profile {profile}"))
            .or_else(|| (profile == "default").then(|| c.get("default")).flatten())
    });
    let creds_section = creds_ini.as_ref().and_then(|c| c.get(&profile));
    if profile_named.is_some() && creds_section.is_none() && config_section.is_none() {
        return Err(Error::Config(format!(
            "profile `{profile}` is in neither {} nor {}",
            creds_file
                .as_deref()
                .unwrap_or(Path::new("~/.aws/credentials"))
                .display(),
            config_file.as_deref().unwrap_or(Path::new("~/.aws/config")).display()
        )));
    }
    let from_profile = |k: &str| {
        creds_section
            .and_then(|s| s.get(k))
            .or_else(|| config_section.and_then(|s| s.get(k)))
            .cloned()
    };

    // A profile named on the command line wins over the environment's
    // keys, as with the AWS CLI's --profile.
    let env_keys = (nonempty("AWS_ACCESS_KEY_ID"), nonempty("AWS_SECRET_ACCESS_KEY"));
    let profile_keys = (from_profile("aws_access_key_id"), from_profile("aws_secret_access_key"));
    let (key, secret, token, from) = match (opts.profile.is_some(), env_keys, profile_keys) {
        (false, (Some(k), Some(s)), _) => (k, s, nonempty("AWS_SESSION_TOKEN"), "the environment".to_string()),
        (_, _, (Some(k), Some(s))) => (k, s, from_profile("aws_session_token"), format!("profile `{profile}`")),
        (true, (Some(k), Some(s)), _) => (k, s, nonempty("AWS_SESSION_TOKEN"), "the environment".to_string()),
        // On an EC2 instance with a role: its temporary keys.
        _ => match imds_keys(&nonempty) {
            Some(r) => (
                r.key,
                r.secret,
                Some(r.token),
                format!("the instance's role `{}`", r.role),
            ),
            None => {
                return Err(Error::Config(
                    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give a profile of \
                     ~/.aws/credentials (AWS_PROFILE or --s3-profile)"
                        .into(),
                ))
            }
        },
    };

    let region = opts
        .region
        .clone()
        .or_else(|| nonempty("AWS_REGION"))
        .or_else(|| nonempty("AWS_DEFAULT_REGION"))
        .or_else(|| from_profile("region"))
        .unwrap_or_else(|| "us-east-1".into());
    let custom = opts
        .endpoint
        .clone()
        .or_else(|| nonempty("AWS_ENDPOINT_URL_S3"))
        .or_else(|| nonempty("AWS_ENDPOINT_URL"))
        .or_else(|| from_profile("endpoint_url"));
    let (endpoint, path_style) = match custom {
        Some(e) => {
            let url = url::Url::parse(&e).map_err(|x| Error::Config(format!("S3 endpoint `{e}`: {x}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(Error::Config(format!(
                    "S3 endpoint `{e}`: give http://HOST[:PORT] or https://HOST[:PORT]"
                )));
            }
            (url, true)
        }
        None => {
            let e = format!("https://s3.{region}.amazonaws.com");
            let url = url::Url::parse(&e).map_err(|x| Error::Config(format!("region `{region}`: {x}")))?;
            (url, false)
        }
    };
    Ok(Resolved {
        endpoint,
        path_style,
        region,
        key,
        secret,
        token,
        from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_environment_then_the_profile_as_the_aws_cli_has_them() {
        let d = tempfile::tempdir().expect("tempdir");
        let creds = d.path().join("credentials");
        let config = d.path().join("config");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = DK\naws_secret_access_key = DS\n\n[work]\naws_access_key_id=WK\naws_secret_access_key=WS\naws_session_token = WT\n",
        )
        .expect("write");
        std::fs::write(
            &config,
            "[default]\nregion = eu-west-3\n[profile work]\nregion = ap-south-1\nendpoint_url = http://127.0.0.1:9000\n",
        )
        .expect("write");
        let files = [
            ("AWS_SHARED_CREDENTIALS_FILE", creds.to_str().expect("utf-8")),
            ("AWS_CONFIG_FILE", config.to_str().expect("utf-8")),
        ];
        let r = resolve(&S3Options::default(), &env_of(&files)).expect("default profile");
        assert_eq!(
            (r.key.as_str(), r.region.as_str(), r.path_style),
            ("DK", "eu-west-3", false)
        );
        assert_eq!(r.endpoint.as_str(), "https://s3.eu-west-3.amazonaws.com/");

        let mut with_env = files.to_vec();
        with_env.extend([
            ("AWS_ACCESS_KEY_ID", "EK"),
            ("AWS_SECRET_ACCESS_KEY", "ES"),
            ("AWS_PROFILE", "work"),
        ]);
        let r = resolve(&S3Options::default(), &env_of(&with_env)).expect("env keys");
        assert_eq!((r.key.as_str(), r.token.as_deref()), ("EK", None));
        // The profile's own endpoint and region still apply.
        assert_eq!((r.region.as_str(), r.path_style), ("ap-south-1", true));

        let named = S3Options {
            profile: Some("work".into()),
            ..Default::default()
        };
        let r = resolve(&named, &env_of(&with_env)).expect("named profile");
        assert_eq!((r.key.as_str(), r.token.as_deref()), ("WK", Some("WT")));

        let missing = S3Options {
            profile: Some("nope".into()),
            ..Default::default()
        };
        let e = resolve(&missing, &env_of(&files)).expect_err("no such profile");
        assert!(e.to_string().contains("profile `nope`"), "{e}");
    }

    #[test]
    fn no_credentials_and_bad_endpoints_say_what_to_do() {
        let off = [("HOME", "/nonexistent"), ("AWS_EC2_METADATA_DISABLED", "true")];
        let e = resolve(&S3Options::default(), &env_of(&off)).expect_err("none");
        assert!(e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");
        let keys = [
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("HOME", "/nonexistent"),
        ];
        let bad = S3Options {
            endpoint: Some("ftp://x".into()),
            ..Default::default()
        };
        assert!(resolve(&bad, &env_of(&keys)).is_err());
        let plain = S3Options {
            endpoint: Some("http://127.0.0.1:9000".into()),
            ..Default::default()
        };
        let r = resolve(&plain, &env_of(&keys)).expect("plain http when named");
        assert_eq!(r.endpoint.scheme(), "http");
        assert!(r.path_style);
    }
}
