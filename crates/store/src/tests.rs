use super::*;

/// The same contract, checked on both implementations.
async fn contract(s: &Store) {
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    s.put("/t/a", b"1".to_vec(), None).await.unwrap();
    let a = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!(a.value, b"1");
    assert!(a.mod_revision > 0);

    // compare-and-put: only against the current revision; 0 means "absent".
    assert!(!s
        .compare_and_put("/t/a", 0, b"x".to_vec(), None)
        .await
        .unwrap());
    assert!(!s
        .compare_and_put("/t/a", a.mod_revision + 100, b"x".to_vec(), None)
        .await
        .unwrap());
    assert!(s
        .compare_and_put("/t/a", a.mod_revision, b"2".to_vec(), None)
        .await
        .unwrap());
    assert_eq!(s.get("/t/a").await.unwrap().unwrap().value, b"2");
    assert!(s
        .compare_and_put("/t/b", 0, b"b".to_vec(), None)
        .await
        .unwrap());
    s.put("/u/c", b"c".to_vec(), None).await.unwrap();

    let keys: Vec<String> = s
        .list("/t/")
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.key)
        .collect();
    assert_eq!(keys, ["/t/a", "/t/b"]);

    let b = s.get("/t/b").await.unwrap().unwrap();
    assert!(!s
        .compare_and_delete("/t/b", b.mod_revision + 1)
        .await
        .unwrap());
    assert!(s.compare_and_delete("/t/b", b.mod_revision).await.unwrap());
    assert!(s.delete("/u/c").await.unwrap());
    assert!(!s.delete("/u/c").await.unwrap());

    // Leases: a leased key lives while the lease is renewed and goes with it.
    let l = s.grant(Duration::from_secs(2)).await.unwrap();
    s.put("/t/leased", b"l".to_vec(), Some(l)).await.unwrap();
    assert_eq!(s.get("/t/leased").await.unwrap().unwrap().lease, Some(l));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        s.keep_alive(l).await.unwrap();
    }
    assert!(
        s.get("/t/leased").await.unwrap().is_some(),
        "renewed lease lost its key"
    );
    // Not renewed: gone after its TTL (etcd checks expiry about every 500 ms).
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.get("/t/leased").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "an expired lease kept its key");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        s.keep_alive(l).await,
        Err(StoreError::LeaseExpired(_))
    ));

    let l2 = s.grant(Duration::from_secs(30)).await.unwrap();
    assert!(s
        .compare_and_put("/t/owner", 0, b"me".to_vec(), Some(l2))
        .await
        .unwrap());
    s.revoke(l2).await.unwrap();
    assert_eq!(s.get("/t/owner").await.unwrap(), None);
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn embedded_store_keeps_the_contract_and_its_keys_across_a_restart() {
    let d = tmp("embedded");
    let path = d.join("state.json");
    let s = Store::open_embedded(&path).unwrap();
    contract(&s).await;
    let l = s.grant(Duration::from_secs(60)).await.unwrap();
    s.put("/t/leased-at-exit", b"x".to_vec(), Some(l))
        .await
        .unwrap();
    let a = s.get("/t/a").await.unwrap().unwrap();
    drop(s);

    let s = Store::open_embedded(&path).unwrap();
    assert_eq!(s.get("/t/a").await.unwrap().unwrap(), a);
    assert_eq!(s.get("/t/leased-at-exit").await.unwrap(), None);
    // Revisions only grow across a restart.
    s.put("/t/z", b"z".to_vec(), None).await.unwrap();
    assert!(s.get("/t/z").await.unwrap().unwrap().mod_revision > a.mod_revision);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn embedded_store_refuses_a_damaged_or_foreign_file() {
    let d = tmp("embedded-bad");
    let path = d.join("state.json");
    std::fs::write(&path, b"{\"version\": 1, \"revision\": ").unwrap();
    assert!(matches!(
        Store::open_embedded(&path),
        Err(StoreError::Corrupt(..))
    ));
    std::fs::write(&path, br#"{"version": 99, "revision": 1, "keys": {}}"#).unwrap();
    let e = Store::open_embedded(&path).err().unwrap().to_string();
    assert!(e.contains("version 99"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn etcd_store_keeps_the_contract() {
    let d = tmp("etcd");
    let etcd = local_etcd::LocalEtcd::start(&d.join("etcd")).await.unwrap();
    let s = Store::connect_etcd(&[etcd.endpoint().to_string()])
        .await
        .unwrap();
    contract(&s).await;
}

#[tokio::test]
async fn etcd_store_reports_an_unreachable_cluster_in_time() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Instant::now();
    let r = Store::connect_etcd(&[format!("http://127.0.0.1:{port}")]).await;
    let r = match r {
        Ok(s) => s.get("/x").await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(r.is_err());
    assert!(t.elapsed() < CALL_TIMEOUT * 3, "{:?}", t.elapsed());
}
