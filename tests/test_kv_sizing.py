"""The KV pool sized from memory when num_pages is not set (issue 11, point 7).

The arithmetic runs on made-up meminfo/cgroup/CUDA numbers; the engine and the
daemon's model service are checked on a tiny model with the reader replaced,
so the figures do not depend on the machine running the tests.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

import pie.engine.engine as engine_module
from pie.config import ConfigError, load_config_file, resolve
from pie.engine import memory
from pie.engine.engine import create_engine, kv_page_bytes
from pie.engine.loaders import load_model
from pie.engine.memory import Available, KvPolicy, size_kv_pool
from pie.interfaces import PieError
from pie.runtime.runtime import Runtime
from pie.service.local import LocalModelService
from tests.model_fixtures import write_tiny_model

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
_FOLDER = tempfile.TemporaryDirectory()
write_tiny_model(_FOLDER.name)


class Arithmetic(TestCase):
    def test_cpu_capped_at_max_kv_pages_says_so(self):
        sizing = size_kv_pool(
            360 * KiB, "cpu", Available(int(12.3 * GiB), "MemAvailable"), KvPolicy()
        )
        self.assertEqual((sizing.pages, sizing.bytes), (1024, 360 * MiB))
        self.assertEqual(
            sizing.reason,
            "1024 pages = 360 MiB: 12.3 GiB available (MemAvailable) - 2.0 GiB headroom "
            "(kv_headroom_bytes), capped at max_kv_pages (1024)",
        )

    def test_cpu_takes_what_is_left_after_the_headroom(self):
        sizing = size_kv_pool(
            MiB, "cpu", Available(2 * GiB + 300 * MiB + 5, "MemAvailable"), KvPolicy()
        )
        self.assertEqual(sizing.pages, 300)
        self.assertNotIn("capped", sizing.reason)

    def test_a_set_max_applies_on_cpu_and_cuda(self):
        policy = KvPolicy(headroom_bytes=0, max_pages=100)
        self.assertEqual(size_kv_pool(MiB, "cpu", Available(GiB, "m"), policy).pages, 100)
        self.assertEqual(size_kv_pool(MiB, "cuda", Available(GiB, "f"), policy).pages, 100)

    def test_cuda_takes_its_fraction_uncapped(self):
        sizing = size_kv_pool(
            MiB, "cuda", Available(80 * GiB, "free on cuda:0"), KvPolicy(cuda_fraction=0.5)
        )
        self.assertEqual(sizing.pages, 40 * 1024)
        self.assertEqual(
            sizing.reason,
            "40960 pages = 40.0 GiB: 0.5 (kv_memory_fraction) x 80.0 GiB free on cuda:0",
        )

    def test_too_little_memory_is_a_clear_error(self):
        with self.assertRaisesRegex(PieError, "no room for a KV pool: .* leaves 0 pages"):
            size_kv_pool(MiB, "cpu", Available(GiB, "MemAvailable"), KvPolicy())
        with self.assertRaisesRegex(PieError, "leaves 10 pages of 1 MiB, fewer than 16"):
            size_kv_pool(MiB, "cuda", Available(20 * MiB, "f"), KvPolicy(cuda_fraction=0.5))


class Readers(TestCase):
    def fake_system(self, meminfo: str | None, limit: str | None, current: str = "0\n"):
        root = Path(self.mktemp())
        (root / "proc").mkdir(parents=True)
        (root / "cg").mkdir()
        if meminfo is not None:
            (root / "proc" / "meminfo").write_text(meminfo)
        if limit is not None:
            (root / "cg" / "memory.max").write_text(limit)
            (root / "cg" / "memory.current").write_text(current)
        return memory.cpu_available(root / "proc", root / "cg")

    MEMINFO = "MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   12000000 kB\n"

    def test_parse_meminfo_and_cgroup_room(self):
        self.assertEqual(memory.parse_meminfo(self.MEMINFO), 12_000_000 * 1024)
        self.assertIsNone(memory.parse_meminfo("MemTotal: 5 kB\n"))
        self.assertIsNone(memory.cgroup_room("max\n", "123\n"))
        self.assertEqual(memory.cgroup_room("1000\n", "300\n"), 700)
        self.assertEqual(memory.cgroup_room("1000\n", "3000\n"), 0)

    def test_the_smaller_of_meminfo_and_the_cgroup_wins(self):
        self.assertEqual(
            self.fake_system(self.MEMINFO, f"{4 * GiB}\n", f"{GiB}\n"),
            Available(3 * GiB, "cgroup memory.max - memory.current"),
        )
        self.assertEqual(
            self.fake_system(self.MEMINFO, "max\n"),
            Available(12_000_000 * 1024, "MemAvailable"),
        )
        self.assertEqual(self.fake_system(None, None).source, "unknown")

    def test_cuda_releases_the_caching_allocator_before_asking(self):
        import torch

        calls: list[str] = []
        self.patch(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
        self.patch(
            torch.cuda, "mem_get_info", lambda d: (calls.append(f"mem_get_info {d}"), (7, 9))[1]
        )
        self.assertEqual(memory.cuda_available("cuda:0").bytes, 7)
        self.assertEqual(calls, ["empty_cache", "mem_get_info cuda:0"])


class EngineSizing(TestCase):
    def setUp(self):
        self.loaded = load_model(_FOLDER.name)

    def pretend_cpu_has(self, available: int) -> None:
        self.patch(engine_module, "cpu_available", lambda: Available(available, "MemAvailable"))

    def test_an_unset_num_pages_is_sized_from_memory(self):
        probe = create_engine(self.loaded, device="cpu", dtype="float32", num_pages=1)
        page = kv_page_bytes(probe.model, 16)
        self.pretend_cpu_has(GiB + 40 * page)
        engine = create_engine(
            self.loaded, device="cpu", dtype="float32", kv_policy=KvPolicy(headroom_bytes=GiB)
        )
        self.assertEqual((engine.cache.num_pages, engine.info.num_kv_pages), (40, 40))
        self.assertTrue(engine.info.kv_sizing.startswith("40 pages = "), engine.info.kv_sizing)
        self.assertIn("(MemAvailable) - 1.0 GiB headroom", engine.info.kv_sizing)

    def test_an_explicit_num_pages_wins_and_reads_no_memory(self):
        self.patch(engine_module, "cpu_available", lambda: self.fail("memory was read"))
        engine = create_engine(self.loaded, device="cpu", dtype="float32", num_pages=8)
        self.assertEqual(engine.cache.num_pages, 8)
        page = kv_page_bytes(engine.model, 16)
        self.assertEqual(
            engine.info.kv_sizing, f"8 pages = {memory.human(8 * page)}: num_pages set"
        )


class ModelStatusReportsTheSizing(TestCase):
    timeout = 60

    async def test_the_daemon_sizes_the_pool_and_model_status_says_why(self):
        probe = create_engine(load_model(_FOLDER.name), device="cpu", dtype="float32", num_pages=1)
        page = kv_page_bytes(probe.model, 16)
        self.pretend = Available(2 * GiB + 500 * page, "MemAvailable")
        self.patch(engine_module, "cpu_available", lambda: self.pretend)
        settings = resolve(
            {
                "model": _FOLDER.name,
                "home": self.mktemp(),
                "device": "cpu",
                "dtype": "float32",
                "max_kv_pages": 64,
            },
            {},
        )
        runtime = Runtime(settings["home"], {}, executor=None, reactor=reactor)
        local = LocalModelService(runtime, settings, reactor)
        local.startService()
        self.addCleanup(local.stopService)
        await local.whenReady()
        [status] = runtime.model_status()
        self.assertEqual(status["num_kv_pages"], 64)
        self.assertRegex(
            status["kv_sizing"],
            r"^64 pages = .*: .* available \(MemAvailable\) - 2\.0 GiB headroom "
            r"\(kv_headroom_bytes\), capped at max_kv_pages \(64\)$",
        )
        self.assertEqual(local.model_service.resources.instance_cap, 48, "3/4 of the pool")


class Settings(TestCase):
    def test_defaults_and_checks(self):
        merged = resolve({}, {})
        self.assertEqual(
            (merged["num_pages"], merged["kv_headroom_bytes"], merged["max_kv_pages"]),
            (0, 2 * GiB, 0),
        )
        self.assertEqual(merged["kv_memory_fraction"], 0.8)
        for bad in ({"num_pages": -1}, {"kv_memory_fraction": 1.5}, {"max_kv_pages": -2}):
            with self.assertRaises(ConfigError):
                resolve(bad, {})

    def test_a_whole_fraction_in_toml_is_a_float(self):
        path = Path(self.mktemp())
        path.write_text("kv_memory_fraction = 1\n")
        self.assertEqual(load_config_file(path), {"kv_memory_fraction": 1.0})
