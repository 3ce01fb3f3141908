//! What a reload of a 10,001-route configuration costs, phase by phase.
//!
//! ```text
//! cargo run --release -p baton-proxy --example reload_cost [ROUTES] [RUNS]
//! ```
//!
//! Generates the configuration `bench/proxy-vs-nginx.sh` reloads (one
//! listener, one upstream, `ROUTES` prefix routes plus `/`) and prints the
//! median CPU time of each phase over `RUNS` runs: the bare TOML parse
//! (`DeTable::parse`) and a parse into a `toml::Table` (for reference), parse + validate (`config::parse`),
//! building the pools and the route tables, and dropping what a reload
//! replaces.

use std::path::Path;
use std::time::Duration;

use baton_proxy::config;
use baton_proxy::reload_cost;

fn text(routes: usize) -> String {
    let mut t = String::from(
        r#"[server]
control_socket = "/tmp/bench.sock"

[[listeners]]
name = "web"
address = "127.0.0.1:8080"

[upstreams.app]
servers = ["127.0.0.1:9001", "127.0.0.1:9002"]

[[routes]]
listener = "web"
path_prefix = "/"
upstream = "app"
"#,
    );
    for i in 0..routes {
        t.push_str(&format!(
            "\n[[routes]]\nlistener = \"web\"\npath_prefix = \"/r{i}\"\nupstream = \"app\"\n"
        ));
    }
    t
}

/// This thread's CPU time: unlike wall time, not inflated by other
/// processes taking turns on the machine.
struct Instant(Duration);

impl Instant {
    fn now() -> Instant {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Instant(Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
    }

    fn elapsed(&self) -> Duration {
        Instant::now().0.saturating_sub(self.0)
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn main() {
    let mut args = std::env::args().skip(1);
    let routes: usize = args.next().map_or(10_000, |a| a.parse().unwrap());
    let runs: usize = args.next().map_or(15, |a| a.parse().unwrap());
    let text = text(routes);
    let path = Path::new("bench.toml");

    let mut detable = Vec::new();
    let mut toml_only = Vec::new();
    let mut parse = Vec::new();
    let mut build = Vec::new();
    let mut drop_table = Vec::new();
    let mut drop_config = Vec::new();
    let mut total = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let doc = toml::de::DeTable::parse(&text).unwrap();
        detable.push(t.elapsed());
        drop(doc);

        let t = Instant::now();
        let table: toml::Table = toml::from_str(&text).unwrap();
        toml_only.push(t.elapsed());
        drop(table);

        let start = Instant::now();
        let c = config::parse(&text, Some(path)).unwrap();
        parse.push(start.elapsed());

        let t = Instant::now();
        let pools = reload_cost::pools(&c);
        let rt = reload_cost::tables(&c, &pools);
        build.push(t.elapsed());
        total.push(start.elapsed());
        assert_eq!(rt.routes("web"), routes + 1);

        let t = Instant::now();
        drop(rt);
        drop_table.push(t.elapsed());
        let t = Instant::now();
        drop(c);
        drop(pools);
        drop_config.push(t.elapsed());
    }
    println!(
        "{} routes, {runs} runs, median CPU ms: DeTable::parse {:.2} | toml::Table only {:.2} | config::parse {:.2} | pools+RouteTable::build {:.2} | parse+build {:.2} | drop table {:.2} | drop config {:.2}",
        routes + 1,
        median(detable),
        median(toml_only),
        median(parse),
        median(build),
        median(total),
        median(drop_table),
        median(drop_config),
    );
}
