//! Caller roles and the permission table: every RPC names the roles that may call it, and
//! anything not listed is refused (least privilege; a new RPC is closed until listed here).

use std::{fmt, str::FromStr};

use anyhow::bail;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Everything, including join tokens.
    Admin,
    /// Policy changes and reads.
    Operator,
    /// Read-only: policy, history, enforcers, the audit log.
    Auditor,
    /// A host's enforcer: subscribe to policy, report status and denied flows.
    Enforcer,
    /// The controller's own server identity (not accepted as a caller).
    Controller,
}

impl Role {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Operator => "operator",
            Self::Auditor => "auditor",
            Self::Enforcer => "enforcer",
            Self::Controller => "controller",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "admin" => Self::Admin,
            "operator" => Self::Operator,
            "auditor" => Self::Auditor,
            "enforcer" => Self::Enforcer,
            "controller" => Self::Controller,
            _ => bail!("unknown role {s:?} (admin, operator, auditor, enforcer)"),
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// Roles allowed to call the RPC at gRPC `path`; empty for unknown paths. Every handler
/// checks its caller against this table, except `Enrollment/Enroll`, which needs no
/// certificate (the join token is the credential).
#[must_use]
pub fn roles_for(path: &str) -> &'static [Role] {
    use Role::{Admin, Auditor, Enforcer, Operator};
    match path.strip_prefix("/ztseg.controller.v1.") {
        Some(
            "Enrollment/CreateJoinToken"
            | "Enrollment/ListJoinTokens"
            | "Enrollment/RevokeJoinToken"
            | "Enrollment/Revoke"
            | "Audit/Prune"
            | "Policy/Prune",
        ) => &[Admin],
        Some("Enrollment/Renew") => &[Admin, Operator, Auditor, Enforcer],
        Some("Policy/Apply" | "Policy/Rollback") => &[Admin, Operator],
        Some("Policy/Diff" | "Policy/Get" | "Policy/History" | "Distribution/ListEnforcers") => {
            &[Admin, Operator, Auditor]
        }
        Some("Distribution/Subscribe" | "Distribution/Report") => &[Enforcer],
        Some("Audit/List" | "Audit/Verify") => &[Admin, Auditor],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforcer_cannot_change_policy_and_operator_cannot_read_audit() {
        assert!(!roles_for("/ztseg.controller.v1.Policy/Apply").contains(&Role::Enforcer));
        assert!(!roles_for("/ztseg.controller.v1.Audit/List").contains(&Role::Operator));
        assert!(roles_for("/ztseg.controller.v1.Distribution/Subscribe").contains(&Role::Enforcer));
        assert!(roles_for("/ztseg.controller.v1.Nope/Nope").is_empty());
        assert_eq!(roles_for("/ztseg.controller.v1.Audit/Prune"), &[Role::Admin], "only admins prune");
        assert_eq!(roles_for("/ztseg.controller.v1.Policy/Prune"), &[Role::Admin], "only admins prune");
        for p in ["ListJoinTokens", "RevokeJoinToken"] {
            assert_eq!(roles_for(&format!("/ztseg.controller.v1.Enrollment/{p}")), &[Role::Admin], "{p}");
        }
        assert!(roles_for("/other.Service/Apply").is_empty());
    }

    #[test]
    fn controller_role_may_call_nothing() {
        for p in [
            "Policy/Apply",
            "Policy/Get",
            "Audit/List",
            "Audit/Prune",
            "Policy/Prune",
            "Distribution/Subscribe",
            "Enrollment/CreateJoinToken",
            "Enrollment/ListJoinTokens",
            "Enrollment/RevokeJoinToken",
            "Enrollment/Revoke",
        ] {
            assert!(!roles_for(&format!("/ztseg.controller.v1.{p}")).contains(&Role::Controller), "{p}");
        }
    }

    #[test]
    fn roles_parse_and_print() {
        for r in [Role::Admin, Role::Operator, Role::Auditor, Role::Enforcer] {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().unwrap_err().to_string().contains("unknown role"));
    }
}
