//! Resolving Docker `USER` specs (`name[:group]`, `uid[:gid]`) with the guest's own
//! /etc/passwd and /etc/group, since the image's userland may have no `id` tool.

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Home directory, `/` without a passwd entry.
    pub home: String,
}

/// Resolves `spec` with the files of the running system; missing files count as empty.
pub fn lookup_user(spec: &str) -> Result<ResolvedUser, String> {
    let passwd = std::fs::read_to_string(PASSWD).unwrap_or_default();
    let group = std::fs::read_to_string(GROUP).unwrap_or_default();
    resolve(spec, &passwd, &group)
}

/// Resolves `spec` against the contents of a passwd and a group file. A numeric user
/// without an entry gets group 0 and home `/`, as Docker does.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<ResolvedUser, String> {
    let (user, group_spec) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user.is_empty() || group_spec.is_some_and(str::is_empty) {
        return Err(format!(
            "invalid user spec {spec:?}: expected name[:group] or uid[:gid]"
        ));
    }
    let users: Vec<PasswdEntry<'_>> = passwd.lines().filter_map(PasswdEntry::parse).collect();
    let entry = match user.parse::<u32>() {
        Ok(uid) => users.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            users
                .iter()
                .find(|e| e.name == user)
                .ok_or_else(|| format!("user {user:?} not found in {PASSWD}"))?,
        ),
    };
    let uid = match (entry, user.parse::<u32>()) {
        (_, Ok(uid)) => uid,
        (Some(e), Err(_)) => e.uid,
        (None, Err(_)) => return Err(format!("user {user:?} not found in {PASSWD}")),
    };
    let gid = match group_spec {
        None => entry.map_or(0, |e| e.gid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .find_map(|line| group_id(line, g))
                .ok_or_else(|| format!("group {g:?} not found in {GROUP}"))?,
        },
    };
    let home = entry
        .map(|e| e.home)
        .filter(|h| !h.is_empty())
        .unwrap_or("/")
        .to_string();
    Ok(ResolvedUser { uid, gid, home })
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

impl<'a> PasswdEntry<'a> {
    /// `name:password:uid:gid:gecos:home:shell`; comments and broken lines are skipped.
    fn parse(line: &'a str) -> Option<PasswdEntry<'a>> {
        if line.starts_with('#') {
            return None;
        }
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        let _gecos = fields.next();
        let home = fields.next().unwrap_or("");
        Some(PasswdEntry {
            name,
            uid,
            gid,
            home,
        })
    }
}

/// The gid on a `name:password:gid:members` line when it is group `name`.
fn group_id(line: &str, name: &str) -> Option<u32> {
    let mut fields = line.split(':');
    if fields.next()? != name {
        return None;
    }
    let _password = fields.next()?;
    fields.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# comment\nbroken line\napp:x:1000:1001:App:/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1001:\n";

    fn user(uid: u32, gid: u32, home: &str) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid,
            home: home.into(),
        }
    }

    #[test]
    fn name_when_listed_then_its_uid_gid_and_home() {
        assert_eq!(
            resolve("app", PASSWD, GROUP),
            Ok(user(1000, 1001, "/home/app"))
        );
    }

    #[test]
    fn name_and_group_when_listed_then_that_group() {
        assert_eq!(
            resolve("app:staff", PASSWD, GROUP),
            Ok(user(1000, 50, "/home/app"))
        );
    }

    #[test]
    fn numeric_when_unlisted_then_gid_0_and_root_home() {
        assert_eq!(resolve("4242", PASSWD, GROUP), Ok(user(4242, 0, "/")));
        assert_eq!(resolve("4242:7", PASSWD, GROUP), Ok(user(4242, 7, "/")));
    }

    #[test]
    fn numeric_when_listed_then_entry_gid_and_home() {
        assert_eq!(
            resolve("1000", PASSWD, GROUP),
            Ok(user(1000, 1001, "/home/app"))
        );
    }

    #[test]
    fn unknown_names_when_resolved_then_error_names_them() {
        let user_error = resolve("nobody2", PASSWD, GROUP).unwrap_err();
        let group_error = resolve("app:wheel", PASSWD, GROUP).unwrap_err();

        assert!(user_error.contains("\"nobody2\""), "{user_error}");
        assert!(group_error.contains("\"wheel\""), "{group_error}");
    }

    #[test]
    fn empty_parts_when_resolved_then_error() {
        assert!(resolve("", PASSWD, GROUP).is_err());
        assert!(resolve("app:", PASSWD, GROUP).is_err());
        assert!(resolve(":0", PASSWD, GROUP).is_err());
    }
}
