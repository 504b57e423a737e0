// The image as the model sees it: the same steps as handlers/image.py `to_pixels`, in the browser.
// Transparency onto the spec's background, Pillow's grey conversion (ITU-R 601-2 luma, fixed point),
// and Pillow's bilinear resize (a triangle filter widened when shrinking, 22-bit fixed-point
// coefficients, horizontal pass then vertical), so a PNG previews to the very pixels the server uses.

const PRECISION_BITS = 32 - 8 - 2; // Pillow's Resample.c for 8-bit images

/** Decodes a File into an ImageBitmap with EXIF orientation applied and no colour management
 *  (Pillow ignores ICC profiles too). Rejects when the browser cannot decode the file. */
export function decode(file) {
  return createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none",
                                   premultiplyAlpha: "none" });
}

/** ImageBitmap -> {channels, height, width, data: Uint8ClampedArray (C, H, W)} per the spec's input. */
export function modelPixels(bitmap, input) {
  const { channels, height, width, background } = input;
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.fillStyle = `rgb(${background[0]}, ${background[1]}, ${background[2]})`;
  context.fillRect(0, 0, canvas.width, canvas.height); // transparency composited onto the background
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const planes = channels === 1 ? [luma(rgba)] : [0, 1, 2].map((c) => plane(rgba, c));
  const sameSize = bitmap.width === width && bitmap.height === height;
  const resized = planes.map((p) => (sameSize ? p : resizeBilinear(p, bitmap.width, bitmap.height, width, height)));
  const data = new Uint8ClampedArray(channels * height * width);
  resized.forEach((p, c) => data.set(p, c * height * width));
  return { channels, height, width, data };
}

/** (C, H, W) pixels -> ImageData to draw on a canvas (grey repeated into R, G and B). */
export function toImageData({ channels, height, width, data }) {
  const image = new ImageData(width, height);
  const size = height * width;
  for (let i = 0; i < size; i++) {
    image.data[4 * i] = data[i];
    image.data[4 * i + 1] = data[(channels === 3 ? size : 0) + i];
    image.data[4 * i + 2] = data[(channels === 3 ? 2 * size : 0) + i];
    image.data[4 * i + 3] = 255;
  }
  return image;
}

function plane(rgba, channel) {
  const out = new Uint8ClampedArray(rgba.length / 4);
  for (let i = 0; i < out.length; i++) out[i] = rgba[4 * i + channel];
  return out;
}

function luma(rgba) { // Pillow's convert("L"): L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16
  const out = new Uint8ClampedArray(rgba.length / 4);
  for (let i = 0; i < out.length; i++) {
    out[i] = (rgba[4 * i] * 19595 + rgba[4 * i + 1] * 38470 + rgba[4 * i + 2] * 7471 + 0x8000) >>> 16;
  }
  return out;
}

/** Per output pixel: the first input pixel and the fixed-point weights (Pillow's precompute_coeffs). */
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filterScale; // bilinear: support 1, widened when shrinking (antialiasing)
  const bounds = [];
  const weights = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const k = [];
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      const w = Math.max(0, 1 - Math.abs((x + xmin - center + 0.5) / filterScale));
      k.push(w);
      total += w;
    }
    bounds.push(xmin);
    weights.push(k.map((w) => {
      const normalized = total !== 0 ? w / total : 0;
      return Math.trunc(normalized < 0 ? -0.5 + normalized * 2 ** PRECISION_BITS : 0.5 + normalized * 2 ** PRECISION_BITS);
    }));
  }
  return { bounds, weights };
}

function resample(value) { // round half up from the fixed-point sum, then clip to 0..255
  return Math.min(255, Math.max(0, Math.floor(value / 2 ** PRECISION_BITS)));
}

function resizeBilinear(pixels, inWidth, inHeight, outWidth, outHeight) {
  let source = pixels;
  let width = inWidth;
  if (outWidth !== inWidth) { // horizontal pass first, as Pillow does
    const { bounds, weights } = coefficients(inWidth, outWidth);
    const out = new Uint8ClampedArray(outWidth * inHeight);
    for (let y = 0; y < inHeight; y++) {
      for (let xx = 0; xx < outWidth; xx++) {
        let sum = 2 ** (PRECISION_BITS - 1);
        const k = weights[xx];
        for (let x = 0; x < k.length; x++) sum += source[y * width + bounds[xx] + x] * k[x];
        out[y * outWidth + xx] = resample(sum);
      }
    }
    source = out;
    width = outWidth;
  }
  if (outHeight !== inHeight) {
    const { bounds, weights } = coefficients(inHeight, outHeight);
    const out = new Uint8ClampedArray(width * outHeight);
    for (let yy = 0; yy < outHeight; yy++) {
      const k = weights[yy];
      for (let x = 0; x < width; x++) {
        let sum = 2 ** (PRECISION_BITS - 1);
        for (let y = 0; y < k.length; y++) sum += source[(bounds[yy] + y) * width + x] * k[y];
        out[yy * width + x] = resample(sum);
      }
    }
    source = out;
  }
  return source;
}
