//! Structured JSON log lines on stderr: `{"ts":…,"level":…,"msg":…,<fields>}`. Fields never
//! carry secrets (the enforcer handles none yet; tokens arrive with the identity issue).

use std::time::{SystemTime, UNIX_EPOCH};

fn emit(level: &str, msg: &str, fields: &[(&str, &str)]) {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut obj = serde_json::Map::new();
    obj.insert("ts".into(), serde_json::json!(ts));
    obj.insert("level".into(), level.into());
    obj.insert("msg".into(), msg.into());
    for (k, v) in fields {
        obj.insert((*k).into(), (*v).into());
    }
    eprintln!("{}", serde_json::Value::Object(obj));
}

pub fn info(msg: &str, fields: &[(&str, &str)]) {
    emit("info", msg, fields);
}

pub fn warn(msg: &str, fields: &[(&str, &str)]) {
    emit("warn", msg, fields);
}

pub fn error(msg: &str, fields: &[(&str, &str)]) {
    emit("error", msg, fields);
}
