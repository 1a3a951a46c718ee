"""Serves `miml-jax demo` with the given models, uploads one image in headless Chromium and
saves the page as a picture: how `demo_screenshot.jpg` here was made.

    python experiments/reports/demo_screenshot.py --image IMAGE \
        --out experiments/reports/demo_screenshot.jpg \
        --model webiml=W1 --model mantranet=W2 --model busternet=W3

Needs the demo and test extras (gradio, playwright) and a Chromium at --chromium.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", action="append", required=True, help="NAME=WORKDIR, repeated")
  parser.add_argument("--image", required=True, help="the image to upload")
  parser.add_argument("--out", required=True, help="the screenshot (.png or .jpg)")
  parser.add_argument("--chromium", default="/usr/bin/chromium")
  parser.add_argument("--width", type=int, default=1500)
  args = parser.parse_args(argv)
  from playwright.sync_api import sync_playwright

  port = free_port()
  command = [sys.executable, "-m", "miml_jax.cli", "demo", "--port", str(port)]
  command += [f"--model={spec}" for spec in args.model]
  server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}/"
  try:
    deadline = time.monotonic() + 300
    while True:
      if server.poll() is not None:
        raise SystemExit(f"the demo exited with {server.returncode}: {' '.join(command)}")
      try:
        with urllib.request.urlopen(url, timeout=2):
          break
      except OSError:
        if time.monotonic() > deadline:
          raise SystemExit(f"the demo did not answer at {url}") from None
        time.sleep(1)
    with sync_playwright() as playwright:
      browser = playwright.chromium.launch(
        executable_path=args.chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
      )
      page = browser.new_page(viewport={"width": args.width, "height": 1200})
      page.set_default_timeout(300_000)
      page.goto(url)
      page.set_input_files("#demo-upload input[type=file]", args.image)
      for index in range(len(args.model)):
        page.wait_for_selector(f"#demo-mask-{index} img")
      page.wait_for_timeout(1000)  # Let every picture finish loading.
      with tempfile.TemporaryDirectory() as folder:
        png = os.path.join(folder, "page.png")
        page.screenshot(path=png, full_page=True)
        browser.close()
        import cv2

        image = cv2.imread(png)
        params = [cv2.IMWRITE_JPEG_QUALITY, 85] if args.out.lower().endswith(".jpg") else []
        cv2.imwrite(args.out, image, params)
    print(f"wrote {args.out}")
  finally:
    server.terminate()
    server.wait(timeout=30)
  return 0


if __name__ == "__main__":
  sys.exit(main())
