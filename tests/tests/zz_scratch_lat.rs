use agenthome::runner::{CommandRunner, TerminalRunner};
use agenthome_tests::fixtures::running_machine;
use agenthome_tests::Emulator;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn scratch() {
    let emu = Emulator::start_with(&["--boot-delay", "0s", "--wake-delay", "0s"]).await;
    let client = emu.client();
    let m = running_machine(&client).await;
    let mid = m.machine_id.clone();
    let (mut r, _tid) = TerminalRunner::open(&client, &mid, None).await.unwrap();
    let (mut a, mut b, mut c) = (vec![], vec![], vec![]);
    for _ in 0..15 {
        let t = Instant::now();
        r.run("echo hi", Duration::from_secs(10)).await.unwrap();
        a.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        r.run_builtins(":", &[], Duration::from_secs(10))
            .await
            .unwrap();
        b.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        r.run_builtins(":", &[], Duration::from_secs(10))
            .await
            .unwrap();
        c.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    for v in [&mut a, &mut b, &mut c] {
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
    }
    println!(
        "cmd {:?}\nbuiltin-after-cmd {:?}\nbuiltin-again {:?}",
        a.iter().map(|x| x.round()).collect::<Vec<_>>(),
        b.iter().map(|x| x.round()).collect::<Vec<_>>(),
        c.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
}
