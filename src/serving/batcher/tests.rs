use super::*;
use crate::model::ModelInfo;
use crate::prefix::synthetic::random_prefix;
use rand::SeedableRng;

fn task(p: usize) -> Arc<Task> {
    let info = ModelInfo {
        name: "tiny".into(),
        layers: 1,
        hidden: 8,
        heads: 2,
        max_positions: 512,
        fingerprint: String::new(),
        hub_id: None,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(p as u64);
    let file = random_prefix(&info, "t", p, 2, &mut rng).unwrap();
    Arc::new(Task::from_file(&file, &info, &file.to_bytes().unwrap()).unwrap())
}

/// Jobs of the given (tokens, task) shapes, in arrival order; ids encode the arrival index.
fn jobs(shapes: &[(usize, &Arc<Task>)]) -> Vec<Job> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, (len, task))| Job {
            task: (*task).clone(),
            tokens: Encoded {
                ids: vec![i as u32; *len],
                type_ids: vec![0; *len],
            },
            enqueued: Instant::now(),
            reply: oneshot::channel().0,
            span: tracing::Span::none(),
            queue: tracing::Span::none(),
        })
        .collect()
}

fn ids(batch: &[Job]) -> Vec<u32> {
    batch.iter().map(|j| j.tokens.ids[0]).collect()
}

#[test]
fn a_lone_row_runs_alone_even_over_budget() {
    let t = task(20);
    let mut pending = jobs(&[(500, &t)]);
    let cfg = BatcherConfig {
        max_batch_tokens: 64,
        ..Default::default()
    };
    assert_eq!(ids(&take_batch(&mut pending, &cfg)), [0]);
    assert!(pending.is_empty());
}

#[test]
fn similar_lengths_group_around_the_oldest_row() {
    let t = task(4);
    // Oldest row has 10 tokens; budget fits 4 rows of ~14 padded tokens.
    let mut pending = jobs(&[(10, &t), (100, &t), (9, &t), (11, &t), (120, &t), (10, &t)]);
    let cfg = BatcherConfig {
        max_batch_rows: 64,
        max_batch_tokens: 4 * 15,
        max_queue_rows: 100,
    };
    let batch = take_batch(&mut pending, &cfg);
    assert_eq!(
        ids(&batch),
        [0, 2, 3, 5],
        "short rows together, arrival order kept"
    );
    assert_eq!(ids(&pending), [1, 4]);
    let batch = take_batch(&mut pending, &cfg);
    assert_eq!(ids(&batch), [1], "two long rows exceed the budget together");
    assert_eq!(ids(&take_batch(&mut pending, &cfg)), [4]);
}

#[test]
fn tasks_mix_and_the_cost_counts_the_longest_prefix() {
    let (short, long) = (task(2), task(30));
    let mut pending = jobs(&[(8, &short), (8, &long), (8, &short)]);
    // 3 rows × (8 + 30) = 114 > 100, 2 rows × (8 + 30) = 76 fits.
    let cfg = BatcherConfig {
        max_batch_rows: 64,
        max_batch_tokens: 100,
        max_queue_rows: 100,
    };
    let batch = take_batch(&mut pending, &cfg);
    assert_eq!(batch.len(), 2);
    assert!(padded_cost(&batch) <= 100);
    assert_eq!(ids(&batch)[0], 0, "the oldest row is always served");
}

/// A model that panics on rows whose first token is 666, fails on 777, answers the rest.
struct Flaky;

impl Backend for Flaky {
    fn classify(&self, rows: &[Row<'_>]) -> Result<Vec<Prediction>, String> {
        if rows.iter().any(|r| r.tokens.ids[0] == 666) {
            panic!("boom");
        }
        if rows.iter().any(|r| r.tokens.ids[0] == 777) {
            return Err("no good".into());
        }
        Ok(rows
            .iter()
            .map(|r| Prediction::from_logits(r.task, vec![r.tokens.ids[0] as f32, 0.0]))
            .collect())
    }
}

fn one(t: &Arc<Task>, id: u32) -> (Job, oneshot::Receiver<Result<Prediction, JobError>>) {
    let (tx, rx) = oneshot::channel();
    let job = Job {
        task: t.clone(),
        tokens: Encoded {
            ids: vec![id, 1],
            type_ids: vec![0, 0],
        },
        enqueued: Instant::now(),
        reply: tx,
        span: tracing::Span::none(),
        queue: tracing::Span::none(),
    };
    (job, rx)
}

#[test]
fn the_model_thread_survives_panics_and_reports_its_health() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let (batcher, thread) =
        Batcher::start(Flaky, BatcherConfig::default(), metrics.clone()).unwrap();
    let t = task(2);
    let ask = |id| {
        let (job, rx) = one(&t, id);
        batcher.submit(vec![job]).unwrap();
        rx.blocking_recv().unwrap()
    };
    assert_eq!(ask(5).unwrap().logits[0], 5.0);
    for _ in 0..UNREADY_AFTER_FAILURES {
        assert!(matches!(ask(666), Err(JobError::Failed(m)) if m.contains("boom")));
    }
    assert_eq!(metrics.model_panics.get(), UNREADY_AFTER_FAILURES as u64);
    assert!(batcher.health().alive());
    assert!(batcher.health().problem().unwrap().contains("failed"));
    assert!(matches!(ask(777), Err(JobError::Failed(m)) if m == "no good"));
    // A good batch clears the failure streak.
    assert_eq!(ask(9).unwrap().logits[0], 9.0);
    assert_eq!(batcher.health().problem(), None);
    batcher.close();
    thread.join().unwrap();
    assert!(!batcher.health().alive());
    let (job, _rx) = one(&t, 1);
    assert!(matches!(
        batcher.submit(vec![job]),
        Err(SubmitError::ModelGone)
    ));
}

/// A backend that takes its time, so rows queue up behind it.
struct Slow;

impl Backend for Slow {
    fn classify(&self, rows: &[Row<'_>]) -> Result<Vec<Prediction>, String> {
        std::thread::sleep(std::time::Duration::from_millis(200));
        Ok(rows
            .iter()
            .map(|r| Prediction::from_logits(r.task, vec![0.0, 1.0]))
            .collect())
    }
}

#[test]
fn abort_answers_queued_rows_shutdown_and_finishes_the_running_batch() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let config = BatcherConfig {
        max_batch_rows: 1,
        ..Default::default()
    };
    let (batcher, thread) = Batcher::start(Slow, config, metrics).unwrap();
    let t = task(2);
    let replies: Vec<_> = (0..5)
        .map(|i| {
            let (job, rx) = one(&t, i);
            batcher.submit(vec![job]).unwrap();
            rx
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(50)); // the first batch is running
    batcher.abort();
    let answers: Vec<_> = replies
        .into_iter()
        .map(|rx| rx.blocking_recv().unwrap())
        .collect();
    assert!(answers[0].is_ok(), "the running batch finishes");
    assert!(
        answers[1..].iter().all(|a| *a == Err(JobError::Shutdown)),
        "{answers:?}"
    );
    thread.join().unwrap();
}

#[test]
fn row_limit_applies() {
    let t = task(1);
    let shapes: Vec<(usize, &Arc<Task>)> = (0..10).map(|_| (5, &t)).collect();
    let mut pending = jobs(&shapes);
    let cfg = BatcherConfig {
        max_batch_rows: 3,
        max_batch_tokens: 10_000,
        max_queue_rows: 100,
    };
    assert_eq!(take_batch(&mut pending, &cfg).len(), 3);
    assert_eq!(pending.len(), 7);
}
