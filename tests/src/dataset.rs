//! Random CRM data with every awkward case the contract allows: `status_id`
//! as int or numeric string (and pointing nowhere, or missing), `deleted` as
//! 0, 1, 1.0 or missing, global and tenant statuses (one shadowing a global
//! id, some deleted), users missing, dangling or without an `id`, equal and
//! missing start times.

use bson::{doc, Bson, DateTime, Document};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct Dataset {
    pub tenants: Vec<i64>,
    pub calls: Vec<Document>,
    pub users: Vec<Document>,
    pub statuses: Vec<Document>,
}

const BASE_MS: i64 = 1_760_349_600_000;

pub fn generate(seed: u64, calls: usize) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tenants = vec![1, 2, 3];
    let mut users: Vec<Document> = (1..=8)
        .map(|i| doc! {"id": i, "name": format!("User {i}"), "email": format!("u{i}@example.com"), "password_hash": format!("hash-{i}"), "role": "agent"})
        .collect();
    // A user without an id, and one with a null id: a missing reference
    // must not match them.
    users.push(doc! {"name": "Ghost", "email": "ghost@example.com"});
    users.push(doc! {"id": Bson::Null, "name": "Null ghost"});
    // Tenant 2's own user: only tenant 2 may see its details.
    users.push(doc! {"id": 9, "name": "Two's agent", "email": "agent@two", "tenant_id": 2});
    users.shuffle(&mut rng);

    let statuses = vec![
        doc! {"id": 1, "name": "Pending", "description": "Calls that are pending", "color": "#FFA500", "deleted": 0},
        doc! {"id": "2", "name": "Scheduled", "description": "Scheduled calls", "color": "#00FF00"},
        doc! {"id": 3_i64, "name": "Done", "description": "Finished", "color": "#008000", "tenant_id": Bson::Null},
        doc! {"id": 4, "name": "Archived", "description": "Gone", "color": "#000000", "deleted": 1},
        doc! {"id": 5, "name": "Tenant two only", "description": "Custom", "color": "#123456", "tenant_id": 2},
        doc! {"id": "2", "name": "Tenant one's own two", "description": "Shadows the global 2", "color": "#ABCDEF", "tenant_id": 1},
        doc! {"id": 6, "name": "Tenant three, deleted", "description": "x", "color": "#FFFFFF", "tenant_id": 3, "deleted": 1},
        doc! {"id": 7, "name": "No colour", "tenant_id": 3},
        // A deleted own status does not hide the live global one.
        doc! {"id": 1, "name": "One's deleted one", "tenant_id": 1, "deleted": 1},
    ];

    let status_choices: Vec<Bson> = vec![
        1.into(),
        "1".into(),
        Bson::Int64(2),
        "2".into(),
        2.0.into(),
        3.into(),
        "3".into(),
        4.into(),
        5.into(),
        "5".into(),
        6.into(),
        7.into(),
        9.into(),
        "01".into(),
        Bson::Null,
    ];
    let times: Vec<i64> = (0..12).map(|i| BASE_MS - i * 3_600_000 + if i % 4 == 0 { 123 } else { 0 }).collect();
    let mut ids: Vec<i64> = (1..=calls as i64).map(|i| i * 3 + 100).collect();
    ids.shuffle(&mut rng);
    let calls = ids
        .into_iter()
        .map(|id| {
            let mut call = doc! {"id": id, "tenant_id": *tenants.choose(&mut rng).expect("tenants"), "subject": format!("Call {id}"), "type": if rng.gen_bool(0.5) { "inbound" } else { "outbound" }};
            let status = status_choices.choose(&mut rng).expect("choices").clone();
            if status != Bson::Null || rng.gen_bool(0.5) {
                call.insert("status_id", status);
            }
            if rng.gen_bool(0.85) {
                call.insert("start_time", DateTime::from_millis(*times.choose(&mut rng).expect("times")));
            }
            for field in ["owner_id", "user_id", "assigned_to_id"] {
                match rng.gen_range(0..12) {
                    0 => {}
                    1 => {
                        call.insert(field, 99);
                    }
                    2 => {
                        call.insert(field, Bson::Null);
                    }
                    3 => {
                        // A string never matches an integer user id.
                        call.insert(field, "3");
                    }
                    4 => {
                        call.insert(field, 9);
                    }
                    _ => {
                        call.insert(field, rng.gen_range(1..=8));
                    }
                }
            }
            match rng.gen_range(0..8) {
                0 => {
                    call.insert("deleted", 1);
                }
                1 => {
                    call.insert("deleted", 1.0);
                }
                2 | 3 => {
                    call.insert("deleted", 0);
                }
                _ => {}
            }
            if rng.gen_bool(0.2) {
                call.insert("notes", doc! {"text": "nested", "tags": ["a", "b"]});
            }
            call
        })
        .collect();
    Dataset { tenants, calls, users, statuses }
}
